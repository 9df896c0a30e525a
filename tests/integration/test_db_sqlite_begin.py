"""SQLite transactions begin on the driver's connection (BEGIN IMMEDIATE for writes): a writer outside the
process holding the database answers ``database_unavailable`` once the busy timeout passes, nothing is
written, and the next write after it lets go goes through."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from keysteward.errors import Unavailable
from keysteward.store.db import Database

pytestmark = pytest.mark.integration


def test_a_write_that_finds_the_database_locked_is_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    with db.write() as conn:
        conn.execute(text("CREATE TABLE probe (n INTEGER)"))
    raw = db.engine.raw_connection()  # the pool's one connection, made to give up on a lock in 50 ms
    raw.dbapi_connection.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
    raw.close()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the write lock
        with pytest.raises(Unavailable) as refused:
            with db.write() as conn:
                conn.execute(text("INSERT INTO probe VALUES (1)"))
        assert refused.value.code == "database_unavailable"
        with db.read() as conn:  # a reader is not held up by the writer (WAL)
            assert conn.execute(text("SELECT count(*) FROM probe")).scalar() == 0
        other.execute("ROLLBACK")
        with db.write() as conn:
            conn.execute(text("INSERT INTO probe VALUES (2)"))
        with db.read() as conn:
            assert conn.execute(text("SELECT n FROM probe")).scalars().all() == [2]
    finally:
        other.close()
        db.dispose()


def test_a_kept_write_connection_is_reused_and_replaced_after_a_failure(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    db.migrate()
    try:
        with db.write(keep=True) as conn:
            conn.execute(text("CREATE TABLE probe (n INTEGER PRIMARY KEY)"))
            first = conn
        with db.write(keep=True) as conn:
            conn.execute(text("INSERT INTO probe VALUES (1)"))
            assert conn is first  # no checkout between the audit writer's batches
        with pytest.raises(Exception, match="UNIQUE"):
            with db.write(keep=True) as conn:
                conn.execute(text("INSERT INTO probe VALUES (2)"))
                conn.execute(text("INSERT INTO probe VALUES (1)"))  # fails: the whole transaction is undone
        with db.write(keep=True) as conn:
            assert conn is not first and first.closed  # a failure leaves nothing kept behind
            conn.execute(text("INSERT INTO probe VALUES (3)"))
        with db.read() as conn:
            assert conn.execute(text("SELECT n FROM probe ORDER BY n")).scalars().all() == [1, 3]
    finally:
        db.dispose()
