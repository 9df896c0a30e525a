"""Backup files: an online, consistent copy of the whole database, and its checked restore.

The file is JSON lines (UTF-8), format 1 (docs/ha.md, "Backup and restore"):

1. a header: ``{"magic": "keysteward-backup", "format": 1, "schema_revision": "0008", "engine":
   "sqlite", "created_at": "...", "cluster_id": "...", "keysteward_version": "..."}``;
2. for each table, in foreign-key order: ``{"table": NAME, "columns": [...]}``, then one JSON array
   per row, its values in that column order (binary columns base64, times ISO 8601);
3. a trailer: ``{"end": "keysteward-backup", "rows": {TABLE: COUNT, ...}, "sha256": HEX}``, the
   SHA-256 of every byte before the trailer line. A file without it is truncated.

It holds what the database holds, key material only wrapped (under the root key, itself under the
seal): a backup alone unwraps nothing. The SHA-256 catches damage, not a forger who rewrites the
digest too; a forged wrapped key fails its AEAD check and a forged audit record fails ``audit verify``.

The copy is one read transaction: on SQLite a WAL snapshot (writers go on), on PostgreSQL one
REPEATABLE READ, READ ONLY transaction. A restore reads the whole file twice before it writes
anything (the header, then the digest, then every line's shape and value), and loads only into a
database with no tables at all, in one transaction.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, LargeBinary, Table, func, inspect, select, text
from sqlalchemy.types import DateTime

from keysteward import __version__
from keysteward.errors import BadRequest, Conflict
from keysteward.store.db import Database, known_revisions, schema_head
from keysteward.store.models import Base

MAGIC = "keysteward-backup"
FORMAT = 1
MAX_LINE = 16 * 1024 * 1024  # no row comes near this (audit bodies, certificates); a longer line is damage
BATCH = 1000
_SKIP = {"alembic_version"}


@dataclass(frozen=True)
class BackupInfo:
    """What a checked backup file holds (its header, and the row counts its trailer confirmed)."""

    path: Path
    schema_revision: str
    engine: str
    created_at: str
    cluster_id: str
    rows: dict[str, int]


def engine_name(db: Database) -> str:
    return "sqlite" if db.is_sqlite else "postgresql"


def _tables() -> list[Table]:
    return list(Base.metadata.sorted_tables)


def _encode(column: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(column.type, LargeBinary):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(column.type, DateTime):
        return value.isoformat()
    return value


def _bad(path: Path, why: str) -> BadRequest:
    return BadRequest(f"{path} is not a usable keysteward backup: {why}; nothing was restored", code="bad_backup")


def _decode(path: Path, column: Any, value: Any) -> Any:
    if value is None:
        return None
    kind = column.type
    try:
        if isinstance(kind, LargeBinary):
            return base64.b64decode(value, validate=True)
        if isinstance(kind, DateTime):
            return datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise _bad(path, f"a bad value in {column.table.name}.{column.name}") from exc
    python_type = kind.python_type
    if python_type is bool and isinstance(value, bool):
        return value
    if python_type is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if python_type is str and isinstance(value, str):
        return value
    raise _bad(path, f"a bad value in {column.table.name}.{column.name}")


# -- create ----------------------------------------------------------------------------------


@contextmanager
def _snapshot(db: Database) -> Iterator[Connection]:
    """One connection in one read transaction."""
    if db.is_sqlite:
        with db.read() as conn:  # BEGIN (deferred): the first read fixes the WAL snapshot
            yield conn
            conn.rollback()
        return
    with db.read() as raw:
        conn = raw.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            yield conn


def _line(out: IO[bytes], digest: Any, obj: Any) -> None:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    digest.update(data)
    out.write(data)


def create(db: Database, output: Path) -> BackupInfo:
    """Write a backup of ``db`` to ``output`` (a new file, mode 0600) from one read transaction."""
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over an existing file
    try:
        with os.fdopen(fd, "wb") as out, db.unbounded():  # long work: no statement deadline on PostgreSQL
            info = _write(db, output, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return info


def _write(db: Database, output: Path, out: IO[bytes]) -> BackupInfo:
    digest = hashlib.sha256()
    rows: dict[str, int] = {}
    with _snapshot(db) as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        present = set(inspect(conn).get_table_names()) - _SKIP
        expected = {t.name for t in _tables()}
        if revision != schema_head() or present != expected:
            raise Conflict(
                f"the database is at schema revision {revision}, this keysteward at {schema_head()}: "
                "start the server of this version once (it migrates), then back up",
                code="schema_mismatch",
            )
        cluster = conn.execute(text("SELECT cluster_id FROM cluster")).scalar_one_or_none()
        header = {
            "magic": MAGIC,
            "format": FORMAT,
            "schema_revision": revision,
            "engine": engine_name(db),
            "created_at": datetime.now(UTC).isoformat(),
            "cluster_id": cluster or "",
            "keysteward_version": __version__,
        }
        _line(out, digest, header)
        for table in _tables():
            columns = list(table.columns)
            _line(out, digest, {"table": table.name, "columns": [c.name for c in columns]})
            count = 0
            query = select(*columns).order_by(*table.primary_key.columns)
            for row in conn.execute(query, execution_options={"yield_per": BATCH}):
                _line(out, digest, [_encode(c, v) for c, v in zip(columns, row, strict=True)])
                count += 1
            rows[table.name] = count
    trailer = {"end": MAGIC, "rows": rows, "sha256": digest.hexdigest()}
    out.write(json.dumps(trailer, separators=(",", ":")).encode() + b"\n")
    return BackupInfo(output, revision, header["engine"], header["created_at"], header["cluster_id"], rows)


# -- check -----------------------------------------------------------------------------------


def _lines(path: Path, fh: IO[bytes]) -> Iterator[bytes]:
    while True:
        line = fh.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise _bad(path, "truncated or damaged (a line without its end)")
        yield line


def _json(path: Path, line: bytes, where: str) -> Any:
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(path, f"damaged {where}") from exc


def _header(path: Path, line: bytes) -> dict[str, Any]:
    header = _json(path, line, "header")
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise _bad(path, "no keysteward backup header (wrong magic)")
    version = header.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(path, "a bad format version")
    if version > FORMAT:
        raise _bad(path, f"format {version} is newer than this keysteward reads ({FORMAT}): restore with a newer one")
    for name in ("schema_revision", "engine", "created_at", "cluster_id"):
        if not isinstance(header.get(name), str):
            raise _bad(path, f"the header has no {name}")
    if header["engine"] not in ("sqlite", "postgresql"):
        raise _bad(path, "an unknown engine in the header")
    revision = header["schema_revision"]
    if revision not in known_revisions():
        raise _bad(path, f"schema revision {revision} is unknown to this keysteward (newer?)")
    if revision != schema_head():
        raise _bad(
            path,
            f"it was made at schema revision {revision} and this keysteward is at {schema_head()}: restore it with "
            "the keysteward version that made it, then upgrade (its server migrates at start)",
        )
    return header


def _check_digest(path: Path) -> dict[str, Any]:
    """Pass 1: the header, then the SHA-256 of everything before the trailer against the trailer's."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        lines = _lines(path, fh)
        first = next(lines, None)
        if first is None:
            raise _bad(path, "empty file")
        _header(path, first)
        previous = first
        for line in lines:
            digest.update(previous)
            previous = line
    trailer = _json(path, previous, "trailer")
    if not isinstance(trailer, dict) or trailer.get("end") != MAGIC:
        raise _bad(path, "truncated (no trailer)")
    if not isinstance(trailer.get("rows"), dict) or not isinstance(trailer.get("sha256"), str):
        raise _bad(path, "a damaged trailer")
    if trailer["sha256"] != digest.hexdigest():
        raise _bad(path, "its SHA-256 does not match (damaged or altered)")
    return trailer


def _rows(path: Path, seen: set[str] | None = None) -> Iterator[tuple[Table, list[str], dict[str, Any]]]:
    """Pass 2 and 3: every table and row, checked against the schema and decoded (``seen``: the tables met)."""
    tables = {t.name: t for t in _tables()}
    seen = set() if seen is None else seen
    table: Table | None = None
    names: list[str] = []
    with path.open("rb") as fh:
        lines = _lines(path, fh)
        next(lines)  # the header, checked in pass 1
        for number, line in enumerate(lines, 2):
            item = _json(path, line, f"line {number}")
            if isinstance(item, list):
                if table is None or len(item) != len(names):
                    raise _bad(path, f"line {number} is a row that fits no table")
                row = {n: _decode(path, table.columns[n], v) for n, v in zip(names, item, strict=True)}
                yield table, names, row
            elif isinstance(item, dict) and "table" in item:
                name, columns = item.get("table"), item.get("columns")
                if name not in tables or name in seen:
                    raise _bad(path, f"line {number} names an unknown or repeated table")
                table = tables[name]
                if not isinstance(columns, list) or not set(table.primary_key.columns.keys()) <= set(columns):
                    raise _bad(path, f"line {number}: the columns of {name} are damaged")
                if not all(isinstance(c, str) and c in table.columns for c in columns) or len(set(columns)) != len(
                    columns
                ):
                    raise _bad(path, f"line {number}: {name} has columns this keysteward does not know")
                seen.add(name)
                names = list(columns)
            elif isinstance(item, dict) and item.get("end") == MAGIC:
                return
            else:
                raise _bad(path, f"line {number} is neither a table nor a row")


def check(path: Path) -> BackupInfo:
    """Read the whole file: header, digest, every row's shape and values. Raises before any write."""
    with path.open("rb") as fh:
        header = _header(path, fh.readline(MAX_LINE + 1))
    trailer = _check_digest(path)
    counts: dict[str, int] = {}
    seen: set[str] = set()
    for table, _names, _row in _rows(path, seen):
        counts[table.name] = counts.get(table.name, 0) + 1
    if seen != {t.name for t in _tables()}:
        raise _bad(path, "tables are missing from it")
    claimed = {k: v for k, v in trailer["rows"].items() if v}
    if counts != claimed:
        raise _bad(path, "its row counts do not match its trailer")
    return BackupInfo(
        path, header["schema_revision"], header["engine"], header["created_at"], header["cluster_id"], counts
    )


# -- restore ---------------------------------------------------------------------------------


def target_tables(db: Database) -> list[str]:
    """The tables the target database holds already (a restore needs none)."""
    with db.read() as conn:
        return sorted(inspect(conn).get_table_names())


def require_empty(present: list[str]) -> None:
    if present:
        raise Conflict(
            f"the target database is not empty (it holds {len(present)} tables); restore only into an empty "
            "database or a fresh data directory (nothing was restored)",
            code="restore_target_not_empty",
        )


def restore(db: Database, info: BackupInfo) -> None:
    """Load a backup that :func:`check` passed into ``db``, which must hold no tables."""
    if info.engine != engine_name(db):
        raise BadRequest(
            f"the backup is of a {info.engine} database and the target is {engine_name(db)}; "
            "restore onto the same engine (nothing was restored)",
            code="backup_engine_mismatch",
        )
    require_empty(target_tables(db))
    db.migrate()
    with db.unbounded(), db.write() as conn:  # long work: no statement deadline on PostgreSQL
        batch: list[dict[str, Any]] = []
        current: Table | None = None
        for table, _names, row in _rows(info.path):
            if table is not current or len(batch) >= BATCH:
                if batch and current is not None:
                    conn.execute(current.insert(), batch)
                batch, current = [], table
            batch.append(row)
        if batch and current is not None:
            conn.execute(current.insert(), batch)
        if not db.is_sqlite:
            _reset_sequences(conn)


def _reset_sequences(conn: Connection) -> None:
    """PostgreSQL serial columns: the next value after the largest restored one."""
    for table in _tables():
        for column in table.primary_key.columns:
            seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": column.name})
            name = seq.scalar_one_or_none()
            if name:
                top = conn.execute(select(func.max(column))).scalar_one_or_none()
                values = {"s": name, "v": top or 1, "called": top is not None}
                conn.execute(text("SELECT setval(:s, :v, :called)"), values)
