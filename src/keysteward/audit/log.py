"""The audit log service: appends links to a tenant's chain, fail-closed, and reads them back.

A caller that changes state appends its record inside its own write transaction, so the
change and its record commit together or not at all. A caller that only reads (decrypt)
writes its record with :meth:`AuditLog.record` before it answers. Either way, if the record
cannot be written the request fails with ``audit_unavailable``.

``record`` and ``commit`` commit in groups (:mod:`keysteward.audit.group_commit`): concurrent callers
hand their records (and changes) to one writer thread, which appends a whole batch in one transaction.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import SQLAlchemyError

from keysteward.audit import chain, checkpoint
from keysteward.audit.group_commit import GroupCommit
from keysteward.audit.pending import Effect, Pending
from keysteward.errors import KeystewardError, Unavailable
from keysteward.store.db import Database
from keysteward.store.driver import DriverStatement, Fetch, driver_cursor, pipelined
from keysteward.store.models import AuditHead, AuditRecord, Cluster

_SCALARS = (str, int, float, bool, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)


def _plain(value: Any) -> bool:
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return True
    if kind is list or kind is tuple:
        return all(type(v) in _SCALAR_TYPES for v in value)
    if kind is dict:
        return all(type(k) is str and type(v) in _SCALAR_TYPES for k, v in value.items())
    return False


def _check_details(details: Mapping[str, Any]) -> None:
    """Audit details are plain metadata: refuse bytes and anything else that could carry a secret."""
    if all(type(k) is str and _plain(v) for k, v in details.items()):
        return  # the common case, exact built-in types, without an ABC check per value
    for key, value in details.items():
        if isinstance(value, Mapping):  # one level of named scalars: labels, verified claims
            if not all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in value.items()):
                _refuse(key)
            continue
        items = value if isinstance(value, list | tuple) else [value]
        if not isinstance(key, str) or not all(isinstance(v, _SCALARS) for v in items):
            _refuse(key)


def _is_destroy(action: str) -> bool:
    """Key, key version, volume (and any later kind's) destruction: each one publishes a checkpoint."""
    return action.endswith(".destroy")


def _refuse(key: object) -> None:
    raise TypeError(f"audit detail {key!r} must be a string, number, boolean, a list of them or a map of them")


_UNAVAILABLE = "the audit record could not be written, so the request was not carried out"


PREPARED = "_body_parts"
"""In a record's fields: its :class:`chain.BodyParts`, made by :func:`prepare` before the write lock is taken."""
ROWS_PER_INSERT = 190
"""Records per SQLite INSERT: 5 values each stay under the 999 bound variables older SQLite builds allow."""
_COLUMNS = ("tenant_id", "seq", "body", "hash", "signature")


def body_parts(fields: Mapping[str, Any]) -> chain.BodyParts:
    """A record's body around its place in the chain, stamped now."""
    return chain.body_parts(
        ts=datetime.now(UTC).isoformat(timespec="microseconds"),
        actor=fields["actor"],
        action=fields["action"],
        target=fields.get("target", ""),
        outcome=fields.get("outcome", "ok"),
        reason=fields.get("reason", ""),
        details=fields.get("details") or {},
    )


def prepare(fields: dict[str, Any]) -> None:
    """The group commit's hook, run for a record before its batch takes the write lock (see :data:`PREPARED`)."""
    if PREPARED not in fields:  # made already when a loop's batch waited for the lock before
        fields[PREPARED] = body_parts(fields)


@functools.cache
def _multi_insert(rows: int) -> str:
    """Fixed text and placeholders only: every value is bound."""
    placeholders = ",".join(["(?, ?, ?, ?, ?)"] * int(rows))
    return f"INSERT INTO audit_records (tenant_id, seq, body, hash, signature) VALUES {placeholders}"  # noqa: S608


_HEADS = "audit_heads"
"""In :meth:`Database.transaction_info`: {tenant: (seq, hash)} of the chain heads the transaction holds locked."""


@contextmanager
def _driver(conn: Connection) -> Iterator[Any]:
    """A cursor on the transaction's driver connection (:func:`keysteward.store.driver.driver_cursor`, which
    invalidates a dead connection). A failure is ``audit_unavailable``."""
    try:
        with driver_cursor(conn) as cursor:
            yield cursor
    except (SQLAlchemyError, KeystewardError) as exc:
        raise Unavailable(_UNAVAILABLE, code="audit_unavailable") from exc


@contextmanager
def _pipeline(conn: Connection, on: bool) -> Iterator[None]:
    """psycopg's pipeline mode on the transaction's connection when ``on``: statements are queued, and sent with
    the next read of a result or the commit, in one round trip."""
    if not on:
        yield
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None
    with raw.pipeline():
        yield


class _ChainSql:
    """The statements of an append (and, on PostgreSQL, of a batch's head lock) in the driver's own SQL (fixed
    text, bound values), run on the transaction's connection. They run once or more per batch on the writer
    thread, where each cost about 40 µs in SQLAlchemy's execution layer (events, parameter processing, result
    set-up), under 10 µs here."""

    def __init__(self, sqlite: bool) -> None:
        if sqlite:  # BEGIN IMMEDIATE already holds the write lock: no FOR UPDATE
            self.head = "SELECT seq, hash FROM audit_heads WHERE tenant_id = :tenant"
            self.insert = (
                "INSERT INTO audit_records (tenant_id, seq, body, hash, signature) "
                "VALUES (:tenant_id, :seq, :body, :hash, :signature)"
            )
            self.move = "UPDATE audit_heads SET seq = :seq, hash = :hash WHERE tenant_id = :tenant"
        else:
            self.head = "SELECT seq, hash FROM audit_heads WHERE tenant_id = %(tenant)s FOR UPDATE"
            self.insert = (
                "INSERT INTO audit_records (tenant_id, seq, body, hash, signature) "
                "VALUES (%(tenant_id)s, %(seq)s, %(body)s, %(hash)s, %(signature)s)"
            )
            self.move = "UPDATE audit_heads SET seq = %(seq)s, hash = %(hash)s WHERE tenant_id = %(tenant)s"


_LOCK = DriverStatement(
    "SELECT tenant_id, seq, hash FROM audit_heads WHERE tenant_id = ANY(:tenants) ORDER BY tenant_id FOR UPDATE"
)
"""PostgreSQL: a batch's tenants' chain heads, locked in one order (:meth:`AuditLog.lock_heads`)."""


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._signer: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()
        self._group = GroupCommit(db, self._append_last, check=_check_details, lock=self.lock_heads, prepare=prepare)
        self._sql = _ChainSql(db.is_sqlite)
        self.on_destroy: list[Callable[[str, int], None]] = []
        """Called with (tenant, seq) when a destroy record is appended (before its transaction commits)."""

    def set_signer(self, key: Ed25519PrivateKey | None) -> None:
        with self._lock:
            self._signer = key

    def public_key(self) -> Ed25519PublicKey:
        with self.db.read() as conn:
            raw = conn.execute(select(Cluster.audit_public_key)).scalar_one()
        return Ed25519PublicKey.from_public_bytes(raw)

    def ensure_head(self, conn: Connection, tenant_id: str) -> None:
        conn.execute(insert(AuditHead).values(tenant_id=tenant_id, seq=0, hash=chain.GENESIS))

    def append(
        self,
        conn: Connection,
        tenant_id: str,
        *,
        actor: str,
        action: str,
        target: str = "",
        outcome: str = "ok",
        reason: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one record inside the caller's write transaction; returns its sequence number."""
        fields = {
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "reason": reason,
            "details": details or {},
        }
        return self.append_many(conn, [(tenant_id, fields)])[0]

    def append_many(self, conn: Connection, entries: list[tuple[str, dict[str, Any]]]) -> list[int]:
        """Append records in order; each tenant's head row is locked and moved once for the lot, and only the
        lot's last link is signed: its signature covers the links before it through the chain (as the next
        signed link covers those written while sealed), and one Ed25519 signature cost 45 µs of the writer's
        time per record."""
        for _, fields in entries:
            _check_details(fields.get("details") or {})
        return self._append_checked(conn, entries)

    def _append_last(self, conn: Connection, entries: list[tuple[str, dict[str, Any]]]) -> list[int]:
        """The group commit's append, the last work of its batch's transaction: on PostgreSQL the inserts, the
        heads' moves and the COMMIT leave in one pipeline, one round trip while the chain heads are locked
        instead of three (each also waited for the GIL its event loop held). SQLAlchemy's commit then finds
        the transaction over and does nothing."""
        return self._append_checked(conn, entries, commit=not self.db.is_sqlite)

    def _append_checked(
        self, conn: Connection, entries: list[tuple[str, dict[str, Any]]], *, commit: bool = False
    ) -> list[int]:
        """:meth:`append_many` of records whose details were checked when they were handed over (the writer's
        batches: :meth:`record` checks them, and the group commit checks what each effect returns).
        ``commit`` (PostgreSQL): queue every statement in a pipeline and commit the transaction in it."""
        seqs = [0] * len(entries)
        by_tenant: dict[str, list[int]] = {}
        for i, (tenant_id, _) in enumerate(entries):
            by_tenant.setdefault(tenant_id, []).append(i)
        signer = self._signer
        locked: dict[str, tuple[int, str]] | None = Database.transaction_info(conn).get(_HEADS)
        with _driver(conn) as cursor, _pipeline(conn, commit):
            for tenant_id, indexes in by_tenant.items():
                head = locked.get(tenant_id) if locked is not None else None
                if head is None:  # not locked by this transaction's batch yet (a round trip on PostgreSQL)
                    cursor.execute(self._sql.head, {"tenant": tenant_id})
                    head = cursor.fetchone()
                if head is None:
                    self.ensure_head(conn, tenant_id)
                    seq, prev = 0, chain.GENESIS
                else:
                    seq, prev = head
                rows = []
                last = indexes[-1]
                for i in indexes:
                    fields = entries[i][1]
                    seq += 1
                    parts = fields.get(PREPARED)
                    if parts is None:  # an effect's record: its fields were made inside the transaction
                        parts = body_parts(fields)
                    body = chain.join_body(parts, seq, prev)
                    prev = chain.link_hash(body)
                    signature = chain.sign(signer, tenant_id, seq, prev) if signer is not None and i == last else None
                    rows.append((tenant_id, seq, body, prev, signature))
                    seqs[i] = seq
                self._insert(cursor, rows)
                destroyed = [seqs[i] for i in indexes if _is_destroy(entries[i][1].get("action", ""))]
                cursor.execute(self._sql.move, {"tenant": tenant_id, "seq": seq, "hash": prev})
                if locked is not None:
                    locked[tenant_id] = (seq, prev)
                if destroyed:
                    for callback in self.on_destroy:
                        callback(tenant_id, max(destroyed))
            if commit:
                conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]
        return seqs

    def _insert(self, cursor: Any, rows: list[tuple[str, int, str, str, bytes | None]]) -> None:
        """SQLite: one multi-row INSERT per :data:`ROWS_PER_INSERT` records (one statement step, so one hand-back
        of the GIL to this thread while it holds the write lock, not one per record); PostgreSQL: executemany."""
        if not self.db.is_sqlite:
            cursor.executemany(self._sql.insert, [dict(zip(_COLUMNS, row, strict=True)) for row in rows])
            return
        for start in range(0, len(rows), ROWS_PER_INSERT):
            part = rows[start : start + ROWS_PER_INSERT]
            cursor.execute(_multi_insert(len(part)), [value for row in part for value in row])

    def lock_heads(self, conn: Connection, tenants: list[str], then: Sequence[Fetch] = ()) -> list[list[Any]]:
        """PostgreSQL: lock these tenants' chain heads, in one order, before a batch's effects run (see
        :func:`keysteward.audit.batch_effects.lock_heads`), and keep what they hold for this transaction's
        appends, which then read no head again; every append keeps that copy current. SQLite's BEGIN IMMEDIATE already
        serialises writers, and its head reads cost no round trip.

        ``then``: statements of the batch's effects to run right after the lock, in the same pipeline (one
        round trip for the lock and all of them): their rows, in order."""
        if self.db.is_sqlite:
            return [statement.rows(conn, values) for statement, values in then]
        try:
            rows, *fetched = pipelined(conn, [(_LOCK, {"tenants": tenants}), *then])
        except SQLAlchemyError as exc:
            if then:
                raise  # the group commit runs the batch again, its effects one at a time
            raise Unavailable(_UNAVAILABLE, code="audit_unavailable") from exc
        Database.transaction_info(conn)[_HEADS] = {tenant: (seq, hash_) for tenant, seq, hash_ in rows}
        return fetched

    def heads(self) -> list[tuple[str, int, str]]:
        """Every chain's committed head: (tenant, seq, hash), chains with no record left out."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(AuditHead.tenant_id, AuditHead.seq, AuditHead.hash)
                .where(AuditHead.seq > 0)
                .order_by(AuditHead.tenant_id)
            ).all()
        return [(r.tenant_id, r.seq, r.hash) for r in rows]

    def sign_checkpoint(self, tenant_id: str, seq: int, hash_hex: str) -> checkpoint.Checkpoint | None:
        """A checkpoint of this head signed by the audit key, or None while sealed (no key to sign with)."""
        signer = self._signer
        if signer is None:
            return None
        return checkpoint.sign(signer, tenant_id, seq, hash_hex, datetime.now(UTC).isoformat(timespec="microseconds"))

    def record(self, tenant_id: str, **fields: Any) -> int:
        """Append one record and wait until it is committed (group commit with concurrent callers)."""
        _check_details(fields.get("details") or {})
        return self._group.wait(self._group.enqueue(Pending(tenant_id, fields)))

    async def record_async(self, tenant_id: str, **fields: Any) -> int:
        """:meth:`record` for the event loop: waits for the commit without holding a thread."""
        _check_details(fields.get("details") or {})
        return await self._group.wait_async(tenant_id, fields, None)

    def commit(self, tenant_id: str, effect: Effect, *, writes: bool = True, first: bool = False) -> int:
        """Run ``effect`` and append the record it returns in one group-committed transaction (``writes``
        False: the effect only reads, and runs without a savepoint; ``first``: ahead of the others waiting)."""
        pending = Pending(tenant_id, {}, effect=effect, writes=writes, first=first)
        return self._group.wait(self._group.enqueue(pending))

    async def commit_async(self, tenant_id: str, effect: Effect, *, writes: bool = True, first: bool = False) -> int:
        """:meth:`commit` for the event loop."""
        return await self._group.wait_async(tenant_id, {}, effect, writes=writes, first=first)

    def close(self) -> None:
        self._group.close()

    def links(self, tenant_id: str, *, after: int = 0, limit: int = 1000) -> list[chain.Link]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(AuditRecord)
                .where(AuditRecord.tenant_id == tenant_id, AuditRecord.seq > after)
                .order_by(AuditRecord.seq)
                .limit(limit)
            ).all()
        return [chain.Link(r.tenant_id, r.seq, r.body, r.hash, r.signature) for r in rows]
