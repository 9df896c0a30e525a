"""The PostgreSQL fixtures give a real, working PostgreSQL 15 server, and ``db_url`` works on both engines."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text

pytestmark = pytest.mark.integration


def test_server_is_postgresql_15(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.dialect.name == "postgresql"
            assert str(conn.scalar(text("SELECT version()"))).startswith("PostgreSQL 15.")
            assert int(str(conn.scalar(text("SHOW server_version_num")))) // 10000 == 15
    finally:
        engine.dispose()


def test_two_connections_see_each_others_committed_rows(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as a, engine.connect() as b:
            a.execute(text("CREATE TABLE t (id int PRIMARY KEY, who text NOT NULL)"))
            a.commit()
            a.execute(text("INSERT INTO t VALUES (1, 'a')"))
            # Uncommitted: invisible to the other session (real MVCC, not a shared in-process store).
            assert b.scalar(text("SELECT count(*) FROM t")) == 0
            b.rollback()
            a.commit()
            assert b.execute(text("SELECT id, who FROM t")).all() == [(1, "a")]
            b.execute(text("INSERT INTO t VALUES (2, 'b')"))
            b.commit()
            assert a.execute(text("SELECT id, who FROM t ORDER BY id")).all() == [(1, "a"), (2, "b")]
            a.rollback()
    finally:
        engine.dispose()


def test_each_pg_url_is_a_fresh_empty_database(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        assert inspect(engine).get_table_names() == []
        with engine.connect() as conn:
            assert str(conn.scalar(text("SELECT current_database()"))).startswith("ks_")
    finally:
        engine.dispose()


def test_db_url_gives_a_usable_engine(db_url: str, request: pytest.FixtureRequest) -> None:
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL)"))
            conn.execute(text("INSERT INTO kv VALUES ('a', '1'), ('b', '2')"))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT k, v FROM kv ORDER BY k")).all() == [("a", "1"), ("b", "2")]
            assert conn.dialect.name == request.node.callspec.params["db_url"]
    finally:
        engine.dispose()
    # The sqlite case must not have pulled in PostgreSQL at all.
    assert ("pg_server" in request.fixturenames) == (engine.dialect.name == "postgresql")
