"""PostgreSQL reads end with a COMMIT, so a connection keeps its prepared statements between transactions.

A ROLLBACK makes psycopg forget them and DEALLOCATE ALL on the server; the pool's connections serve the
audit writer too, whose statements were then parsed and planned again and again (docs/operations.md).
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from keysteward.store.db import Database

pytestmark = pytest.mark.integration


def test_reads_keep_the_connections_prepared_statements(pg_url: str) -> None:
    db = Database(pg_url)
    db.migrate()
    try:
        for _ in range(8):  # psycopg prepares a statement on its fifth run on a connection
            with db.read() as conn:
                assert conn.execute(text("SELECT count(*) FROM tenants WHERE id = :i"), {"i": "x"}).scalar_one() == 0
        with db.read() as conn:
            prepared = conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one()
        assert prepared >= 1
    finally:
        db.dispose()


def test_a_read_that_raises_is_rolled_back(pg_url: str) -> None:
    db = Database(pg_url)
    db.migrate()
    try:
        with pytest.raises(RuntimeError), db.read() as conn:
            conn.execute(text("CREATE TEMP TABLE scratch (x int)"))
            raise RuntimeError("the reader failed")
        with db.read() as conn:
            assert conn.execute(text("SELECT to_regclass('pg_temp.scratch')")).scalar_one() is None
    finally:
        db.dispose()
