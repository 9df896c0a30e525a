"""Database engines and transactions for SQLite (WAL, embedded default) and PostgreSQL.

``Database.write()`` opens a transaction that takes the write lock up front (``BEGIN
IMMEDIATE`` on SQLite; row locks with ``SELECT ... FOR UPDATE`` on PostgreSQL, see
:func:`for_update`), so read-modify-write sequences never lose updates between processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError

from keysteward.errors import Unavailable

_MIGRATIONS = Path(__file__).parent / "migrations"


class Database:
    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 20) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=pool_size,
                max_overflow=pool_size,
            )
            _configure_sqlite(self.engine, sqlite_synchronous)
        elif url.startswith("postgresql"):
            self.engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=300)
        else:
            raise ValueError("database_url must be sqlite:/// or postgresql+psycopg://")
        self._writer: Engine = self.engine.execution_options(ks_write=True)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with _translate(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with _translate(), self._writer.begin() as conn:
            yield conn

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["connection_url"] = self.url
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        self.engine.dispose()


def for_update(stmt: Any, db: Database) -> Any:
    """Row-lock a select on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers."""
    return stmt if db.is_sqlite else stmt.with_for_update()


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    if synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
        raise ValueError("sqlite_synchronous must be FULL, NORMAL or EXTRA")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA secure_delete=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("ks_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


@contextmanager
def _translate() -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise Unavailable("the database is not available", code="database_unavailable") from exc


def checkpoint(db: Database) -> None:
    """Fold the SQLite WAL into the main file and truncate it (after crypto-shredding)."""
    if db.is_sqlite:
        with db.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
