"""Database.after_commit: a hook runs once its write transaction commits, never when it rolls back."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from keysteward.store.db import Database

pytestmark = pytest.mark.integration


def test_hooks_run_after_the_commit_in_order_and_never_after_a_rollback(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    seen: list[str] = []
    try:
        with db.write() as conn:
            conn.execute(text("CREATE TABLE bell_probe (n INTEGER)"))
            db.after_commit(conn, lambda: seen.append("first"))

            def committed_already() -> None:
                with db.read() as other:  # another connection sees the row: the commit came first
                    rows = other.execute(text("SELECT count(*) FROM bell_probe")).scalar()
                    seen.append(f"rows={rows}")

            conn.execute(text("INSERT INTO bell_probe VALUES (1)"))
            db.after_commit(conn, committed_already)
            assert seen == []
        assert seen == ["first", "rows=1"]

        with pytest.raises(RuntimeError), db.write() as conn:
            conn.execute(text("INSERT INTO bell_probe VALUES (2)"))
            db.after_commit(conn, lambda: seen.append("rolled back"))
            raise RuntimeError("the request failed")
        with db.write() as conn:  # the pooled connection again: the rolled-back hook is gone
            conn.execute(text("INSERT INTO bell_probe VALUES (3)"))
        assert seen == ["first", "rows=1"]
        with db.read() as conn:
            assert conn.execute(text("SELECT n FROM bell_probe ORDER BY n")).scalars().all() == [1, 3]
    finally:
        db.dispose()
