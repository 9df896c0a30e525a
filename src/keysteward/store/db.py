"""Database engines and transactions for SQLite (WAL, embedded default) and PostgreSQL.

``Database.write()`` opens a transaction that takes the write lock up front (``BEGIN
IMMEDIATE`` on SQLite; row locks with ``SELECT ... FOR UPDATE`` on PostgreSQL, see
:func:`for_update`), so read-modify-write sequences never lose updates between processes.
On SQLite, writers first queue on a lock file (``flock``): the kernel wakes the next writer
the moment the lock is free, where SQLite's own busy handler would sleep in steps of up to
100 ms between tries. WAL checkpoints run in a background thread once a second instead of
inside whichever commit crosses the threshold, so no request waits for one.

SQLite's durability (``sqlite_synchronous``, default ``FULL``): a write transaction returns only once its
WAL frames are on disk, but the ``fsync`` happens after the write lock is free. The connections run
``synchronous=NORMAL`` (a commit writes its frames, no fsync) and :meth:`Database.write` fsyncs the WAL
file after releasing the lock, before it returns and before its after-commit hooks run. The WAL is
append-only between checkpoints (and a checkpoint syncs it first), so that fsync makes this transaction
and every earlier one durable: what a caller is told was committed is on disk, as with ``FULL``, while
the other server processes' transactions are no longer queued behind each fsync (the audit writers of
two workers took turns holding the lock through every batch's fsync). ``NORMAL`` skips that fsync
(a power loss may lose the last commits); ``EXTRA`` is SQLite's own, synced inside the lock.

On PostgreSQL the URL may name several hosts (a Patroni cluster, see docs/ha.md and
:mod:`keysteward.store.pg_ha`): connections go to the read-write one, dead pooled connections are
replaced at checkout, a hung primary's connections are cut after ``timeout`` seconds, and a commit whose
synchronous replication wait was cancelled raises ``database_unavailable`` instead of returning.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError

from keysteward.errors import Unavailable
from keysteward.store import pg_ha

log = logging.getLogger("keysteward.store")
_MIGRATIONS = Path(__file__).parent / "migrations"
_AFTER_COMMIT = "keysteward.after_commit"
_TRANSACTION = "keysteward.transaction"
CHECKPOINT_SECONDS = 1.0
RESTART_WAIT_MS = 50
"""How long a checkpoint holding the write lock waits for readers still on the WAL before it lets go."""
BUSY_TIMEOUT_MS = 30000
WAL_LIMIT_BYTES = 64 << 20
"""A WAL longer than this (after a burst) is cut back to it when it starts again."""
TIMEOUT_SECONDS = 10.0
"""PostgreSQL: a statement (a commit waiting for a synchronous standby included) is cancelled after this."""
_READ_ONLY = "25006"  # a write reached a standby (a demoted primary): the cluster is failing over


class WriteLockBusy(Exception):
    """``Database.write(wait=False)``: another writer holds the lock; nothing was done."""


class Database:
    def __init__(
        self, url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 20, timeout: float = TIMEOUT_SECONDS
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._guard: pg_ha.Guard | None = None
        self._wal: str | None = None
        """The WAL file that :meth:`write` fsyncs after the lock is free (SQLite on disk in ``FULL``), else None."""
        if self.is_sqlite:
            synchronous = sqlite_synchronous.upper()
            if synchronous not in {"FULL", "NORMAL", "EXTRA"}:
                raise ValueError("sqlite_synchronous must be FULL, NORMAL or EXTRA")
            self.engine = create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=pool_size,
                max_overflow=pool_size,
            )
            if synchronous == "FULL" and _on_disk(self.engine):
                self._wal = f"{self.engine.url.database}-wal"
            # FULL on disk is made by Database.sync after each write, on NORMAL connections
            _configure_sqlite(self.engine, "NORMAL" if self._wal else synchronous)
        elif url.startswith("postgresql"):
            self.engine = create_engine(
                pg_ha.engine_url(url),
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_recycle=300,
                pool_use_lifo=True,  # the last used, whose prepared statements are warm (see read)
                connect_args=pg_ha.connect_args(timeout),
            )
            self._guard = pg_ha.Guard(self.engine, timeout)
        else:
            raise ValueError("database_url must be sqlite:/// or postgresql+psycopg://")
        self._writer: Engine = self.engine.execution_options(ks_write=True)
        self._thread_lock = threading.Lock()
        self._kept = threading.local()
        """A thread's kept SQLite write connection (``write(keep=True)``)."""
        self._lock_file: int | None = None
        self._stop = threading.Event()
        if self.is_sqlite and _on_disk(self.engine):
            path = f"{self.engine.url.database}.writelock"
            self._lock_file = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            threading.Thread(target=self._checkpoints, name="keysteward-checkpoint", daemon=True).start()

    def _checkpoints(self) -> None:
        """Once a second: copy the WAL into the database file, then let the WAL start again from its beginning.

        A checkpoint alone never shortens the WAL. SQLite writes from its start again only when a writer begins
        while every frame is copied and no reader holds a snapshot of it; under a steady load there is always
        a frame or a reader, and the WAL grew by every commit (400 MB in 15 s of KMIP load, each write onto a
        page the kernel zeroed first). So the copy runs unlocked (PASSIVE: most of the frames), then once more
        under the write lock, where ``RESTART`` copies the few frames written meanwhile and waits, at most
        :data:`RESTART_WAIT_MS`, for the readers still on the WAL; the next writer then starts it again."""
        last = -1
        while not self._stop.wait(CHECKPOINT_SECONDS):
            try:
                with self.engine.connect() as conn:
                    raw = conn.connection.dbapi_connection
                    assert raw is not None
                    cur = raw.cursor()  # the driver's own: no transaction around a checkpoint
                    try:
                        cur.execute("PRAGMA wal_checkpoint(PASSIVE)")
                        frames = (cur.fetchone() or (0, -1))[1]
                        if frames > 0 and frames != last:  # -1: another process's checkpoint; same: nothing new
                            with self._write_lock():
                                cur.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
                                try:
                                    cur.execute("PRAGMA wal_checkpoint(RESTART)")
                                    cur.fetchone()
                                finally:
                                    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                        last = frames
                    finally:
                        cur.close()
            except Exception:  # noqa: BLE001, S112 - the next round tries again; commits never depend on it
                continue

    @property
    def can_try_write(self) -> bool:
        """Whether ``write(wait=False)`` can tell a busy write lock at once (SQLite in a file: its lock file)."""
        return self._lock_file is not None

    @contextmanager
    def _write_lock(self, wait: bool = True) -> Iterator[None]:
        if self._lock_file is None:
            yield
            return
        if not self._thread_lock.acquire(blocking=wait):
            raise WriteLockBusy
        try:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriteLockBusy from None
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads. On PostgreSQL its transaction ends with a ``COMMIT`` (nothing to commit: the
        same as a rollback for a transaction that only read), because a ``ROLLBACK`` makes psycopg forget the
        connection's prepared statements and ``DEALLOCATE ALL`` of them on the server; the pool's connections
        serve the audit writer too, whose statements were then parsed and planned again on each connection
        (40% of PostgreSQL's CPU in a release run). A read that raises is rolled back as before."""
        with _translate(), self.engine.connect() as conn:
            yield conn
            if self._guard is not None and conn.in_transaction():
                conn.commit()

    @contextmanager
    def write(self, *, keep: bool = False, wait: bool = True) -> Iterator[Connection]:
        """A write transaction. ``keep``: on SQLite, this thread keeps its connection for its next ``keep``
        write (the audit writer's batches: a pool checkout and return cost a third of an empty transaction);
        a PostgreSQL connection is always checked out per transaction, which the guard's deadline is for.
        ``wait`` False (with :attr:`can_try_write`): raise :class:`WriteLockBusy`, before anything is done,
        when another thread or process holds the write lock, instead of queueing for it."""
        if keep and self.is_sqlite:
            with _translate(), self._write_lock(wait):
                conn = getattr(self._kept, "conn", None)
                if conn is None or conn.closed or conn.invalidated:
                    conn = self._kept.conn = self._writer.connect()
                try:
                    hooks = yield from self._transaction(conn)
                except BaseException:
                    self._kept.conn = None
                    conn.close()  # after a failure, the next write starts on a fresh connection
                    raise
        else:
            with _translate(), self._write_lock(wait), self._writer.connect() as conn:
                hooks = yield from self._transaction(conn)
        self.sync()
        for hook in hooks:
            hook()

    def sync(self) -> None:
        """SQLite in ``FULL``: the WAL file (so every committed transaction) to disk; else nothing.

        Run after the write lock is free (see the module doc). No WAL file means the last connection
        closed it after a full checkpoint, which synced the database file first."""
        if self._wal is None:
            return
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            log.error("the SQLite WAL could not be synced to disk (errno %s): commits may not be durable", exc.errno)
            raise Unavailable("the database could not be synced to disk", code="database_unavailable") from None
        finally:
            os.close(fd)

    def _transaction(self, conn: Connection) -> Generator[Connection, None, list[Callable[[], None]]]:
        """Yields the connection in its transaction; returns the after-commit hooks, for write() to run once
        the commit is on disk."""
        raw = conn.connection.dbapi_connection
        if self._guard is not None:
            pg_ha.clear_notices(raw)
        conn.info.pop(_AFTER_COMMIT, None)  # a pooled connection: nothing left from an earlier use
        conn.info.pop(_TRANSACTION, None)
        try:
            with conn.begin():
                yield conn
        finally:
            conn.info.pop(_TRANSACTION, None)
        if self._guard is not None and pg_ha.commit_was_cancelled(raw):
            raise Unavailable(pg_ha.SYNC_CANCELLED, code="database_unavailable")
        hooks: list[Callable[[], None]] = conn.info.pop(_AFTER_COMMIT, [])
        return hooks

    @staticmethod
    def transaction_info(conn: Connection) -> dict[str, Any]:
        """Scratch space that lives as long as the write transaction of ``conn`` (what it has learned, such
        as the audit heads it locked); empty again in the next transaction."""
        info: dict[str, Any] = conn.info.setdefault(_TRANSACTION, {})
        return info

    @staticmethod
    def after_commit(conn: Connection, hook: Callable[[], None]) -> None:
        """Run ``hook`` once the write transaction of ``conn`` has committed (never if it rolls back)."""
        conn.info.setdefault(_AFTER_COMMIT, []).append(hook)

    @contextmanager
    def unbounded(self) -> Iterator[None]:
        """Long work (migrations, backups): this thread's connections get no deadline, no statement timeout."""
        if self._guard is None:
            yield
            return
        with self._guard.unbounded():
            yield

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["connection_url"] = self.url
        with self.unbounded(), self.engine.begin() as conn:
            if not self.is_sqlite:
                conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        self.sync()

    def dispose(self) -> None:
        self._stop.set()
        if self._guard is not None:
            self._guard.close()
        self.engine.dispose()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


def known_revisions() -> set[str]:
    """Every schema revision this version's migrations know (a backup names the one it was made at)."""
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def schema_head() -> str:
    """The schema revision this version's migrations end at."""
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_alembic_config()).get_current_head())


def for_update(stmt: Any, db: Database) -> Any:
    """Row-lock a select on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers."""
    return stmt if db.is_sqlite else stmt.with_for_update()


def _on_disk(engine: Engine) -> bool:
    """A SQLite database in a file (not in memory): it has a WAL, a write lock file and checkpoints."""
    return engine.url.database not in (None, "", ":memory:")


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA secure_delete=ON")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA wal_autocheckpoint=0")  # see Database._checkpoints
        cur.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # on the driver's connection: through exec_driver_sql this statement was a third of an empty
        # transaction's CPU; its errors are wrapped as SQLAlchemy would (a busy database: OperationalError)
        statement = "BEGIN IMMEDIATE" if conn.get_execution_options().get("ks_write", False) else "BEGIN"
        raw = conn.connection.dbapi_connection
        assert raw is not None
        try:
            raw.execute(statement)
        except sqlite3.Error as exc:
            raise OperationalError(statement, None, exc) from exc


@contextmanager
def _translate() -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise Unavailable("the database is not available", code="database_unavailable") from exc
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != _READ_ONLY:
            raise
        raise Unavailable("the database is failing over (reached a standby)", code="database_unavailable") from exc


def checkpoint(db: Database) -> None:
    """Fold the SQLite WAL into the main file and truncate it (after crypto-shredding)."""
    if db.is_sqlite:
        with db.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
