"""``backup restore``: a checked backup into a fresh data directory, or into the empty database it names.

Two targets (docs/ha.md, "Backup and restore"):

* a data directory that holds ``keysteward.toml`` (put back from the operator's own copy, with its TLS
  files): the database its settings name must hold no tables yet;
* a data directory that does not exist or is empty: it is made as ``server init`` makes one (0700, a new
  TLS certificate unless ``--plain-http``), with the database in it (SQLite) or at ``database_url``, which
  must then be empty. No root key is made: the backup's sealed root key is the one the server unseals.

Everything that can refuse does so before anything is written: the backup is read in full (header,
digest, every row), the engines are compared, and the target is checked for emptiness.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from keysteward.errors import BadRequest, Conflict
from keysteward.server import datadir
from keysteward.server.run import make_tls
from keysteward.settings import CONFIG_NAME, Settings, load, render
from keysteward.store import backup
from keysteward.store.db import Database


@dataclass(frozen=True)
class Target:
    """Where to restore to when the data directory is fresh (ignored when it holds a configuration)."""

    database_url: str = ""
    listen_host: str = "127.0.0.1"
    listen_port: int = 8443
    tls: bool = True


@dataclass(frozen=True)
class Restored:
    info: backup.BackupInfo
    settings: Settings
    made_data_dir: bool


def _engine_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def _fresh_settings(data_dir: Path, target: Target) -> Settings:
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise Conflict(
            f"{data_dir} is not empty and holds no {CONFIG_NAME}: restore into a fresh data directory, or put the "
            f"{CONFIG_NAME} of the server being restored there first (nothing was restored)",
            code="restore_target_not_empty",
        )
    if not target.tls and target.listen_host not in {"127.0.0.1", "::1", "localhost"}:
        raise BadRequest("plain HTTP is only allowed on loopback", code="tls_required")
    settings = load(data_dir)
    server = dataclasses.replace(
        settings.server,
        database_url=target.database_url or settings.server.database_url,
        listen_host=target.listen_host,
        listen_port=target.listen_port,
        tls=target.tls,
    )
    return dataclasses.replace(settings, server=server)


def _check_empty(settings: Settings) -> None:
    """Refuse a target database that holds tables, without creating anything."""
    files = datadir.sqlite_files(settings.database_url)
    if files and not files[0].exists():
        return  # a SQLite file that is not there yet is empty
    db = Database(settings.database_url, pool_size=1)
    try:
        present = backup.target_tables(db)
    finally:
        db.dispose()
    backup.require_empty(present)


def restore(path: Path, data_dir: Path, target: Target) -> Restored:
    info = backup.check(path)  # the whole file, before anything else
    has_config = (data_dir / CONFIG_NAME).exists()
    settings = load(data_dir) if has_config else _fresh_settings(data_dir, target)
    if _engine_of(settings.database_url) != info.engine:
        raise BadRequest(
            f"the backup is of a {info.engine} database and the target is {_engine_of(settings.database_url)}; "
            "restore onto the same engine (nothing was restored)",
            code="backup_engine_mismatch",
        )
    _check_empty(settings)
    made = not data_dir.exists()
    try:
        if not has_config:
            datadir.prepare(data_dir)
            if settings.server.tls:
                settings, _ca = make_tls(settings)
        db = Database(settings.database_url, sqlite_synchronous=settings.storage.sqlite_synchronous, pool_size=2)
        try:
            backup.restore(db, info)
        finally:
            db.dispose()
        if not has_config:
            (data_dir / CONFIG_NAME).write_text(render(settings))
    except BaseException:
        if not has_config:  # the directory was fresh: leave it as it was
            _empty(data_dir, remove=made)
        raise
    datadir.lock_down(data_dir, datadir.sqlite_files(settings.database_url))
    return Restored(info, settings, not has_config)


def _empty(data_dir: Path, *, remove: bool) -> None:
    if remove:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for entry in data_dir.iterdir() if data_dir.exists() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
