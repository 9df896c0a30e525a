"""keysteward's PostgreSQL connections behind a failover, on real PostgreSQL 15 servers (no Patroni here:
tests/e2e/test_ha_faults.py runs the whole cluster).

- a multi-host URL whose first host is dead reaches the live one, and libpq's read-write check skips a
  server that is not writable;
- a commit whose synchronous replication wait is cancelled (a synchronous standby that never comes)
  is reported as ``database_unavailable``, never as success, though PostgreSQL committed it locally;
- a hung server (its backend SIGSTOPped, the kernel still acknowledging TCP) gets the connection cut after
  the timeout: the write fails with ``database_unavailable`` instead of hanging, and the pool recovers;
- the URL parser keeps one-host URLs as they are and rewrites libpq's host lists.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text

from keysteward.errors import Unavailable
from keysteward.store.db import Database
from keysteward.store.pg_ha import engine_url
from tests.support import pgcluster
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgCluster]:
    """A cluster of this module's own: its replication settings change."""
    cluster = pgcluster.start(prefix="ks-pgha-")
    try:
        yield cluster
    finally:
        cluster.stop()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _table(db: Database) -> None:
    with db.write() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)"))


def test_url_with_hosts_list_is_rewritten_and_one_host_is_kept() -> None:
    one = "postgresql+psycopg://ks@db:5432/keysteward"
    assert engine_url(one) == one
    many = engine_url("postgresql+psycopg://ks:pw@a:5432,b:5433/keysteward")
    assert many.startswith("postgresql+psycopg://ks:pw@/keysteward?")
    assert "host=a:5432&host=b:5433" in many
    assert "target_session_attrs=read-write" in many and "connect_timeout=3" in many
    given = engine_url("postgresql+psycopg://ks@a:1,b:2/k?target_session_attrs=primary&connect_timeout=9")
    assert "target_session_attrs=primary" in given and "read-write" not in given and "connect_timeout=9" in given


def test_first_host_dead_the_next_one_answers(own_pg: PgCluster) -> None:
    url = f"postgresql+psycopg://{own_pg.user}@127.0.0.1:{_dead_port()},127.0.0.1:{own_pg.port}/postgres"
    db = Database(url, timeout=5)
    try:
        _table(db)
        with db.write() as conn:
            conn.execute(text("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING"))
        with db.read() as conn:
            assert conn.scalar(text("SELECT count(*) FROM t WHERE id = 1")) == 1
    finally:
        db.dispose()


def test_read_only_server_is_skipped_by_target_session_attrs(own_pg: PgCluster) -> None:
    with own_pg.admin() as admin:
        admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        admin.execute("SELECT pg_reload_conf()")
    try:
        url = f"postgresql+psycopg://{own_pg.user}@127.0.0.1:{own_pg.port},127.0.0.1:{_dead_port()}/postgres"
        db = Database(url, timeout=5)
        try:
            with pytest.raises(Unavailable) as caught, db.write() as conn:
                conn.execute(text("SELECT 1"))
            assert caught.value.code == "database_unavailable"
        finally:
            db.dispose()
    finally:
        with own_pg.admin() as admin:
            admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
            admin.execute("SELECT pg_reload_conf()")


def test_cancelled_synchronous_replication_wait_is_a_failure(own_pg: PgCluster) -> None:
    db = Database(own_pg.url("postgres"), timeout=1)
    try:
        _table(db)
        with own_pg.admin() as admin:
            admin.execute("ALTER SYSTEM SET synchronous_commit = on")
            admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'ks_standby_that_never_comes'")
            admin.execute("SELECT pg_reload_conf()")
        time.sleep(0.3)
        db.engine.dispose()  # new sessions with the new settings
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught, db.write() as conn:
                conn.execute(text("INSERT INTO t VALUES (2)"))
            assert caught.value.code == "database_unavailable"
            assert "synchronous standby" in caught.value.message
            assert 0.9 < time.monotonic() - started < 5
        finally:
            with own_pg.admin() as admin:
                admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
                admin.execute("ALTER SYSTEM RESET synchronous_commit")
                admin.execute("SELECT pg_reload_conf()")
        # PostgreSQL did commit it locally: exactly why success must not be claimed (a failover may lose it)
        with db.read() as conn:
            assert conn.scalar(text("SELECT count(*) FROM t WHERE id = 2")) == 1
        time.sleep(0.3)
        db.engine.dispose()
        with db.write() as conn:  # with the standby requirement gone, the same path succeeds
            conn.execute(text("INSERT INTO t VALUES (3)"))
    finally:
        db.dispose()


def test_hung_server_connection_is_cut_and_the_pool_recovers(own_pg: PgCluster) -> None:
    db = Database(own_pg.url("postgres"), timeout=1)
    try:
        _table(db)
        with db.read() as conn:
            pid = int(conn.scalar(text("SELECT pg_backend_pid()")) or 0)
        assert pid > 0
        os.kill(pid, signal.SIGSTOP)  # this session's server process hangs; the kernel still speaks TCP
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught, db.write() as conn:
                conn.execute(text("INSERT INTO t VALUES (4)"))
            assert caught.value.code == "database_unavailable"
            assert time.monotonic() - started < 8
        finally:
            os.kill(pid, signal.SIGCONT)
        with db.write() as conn:  # a fresh connection; the cut one was dropped
            conn.execute(text("INSERT INTO t VALUES (5) ON CONFLICT DO NOTHING"))
            assert int(conn.scalar(text("SELECT pg_backend_pid()")) or 0) != pid
    finally:
        db.dispose()


def test_statement_timeout_is_set_on_sessions(own_pg: PgCluster) -> None:
    db = Database(own_pg.url("postgres"), timeout=2.5)
    try:
        with db.read() as conn:
            assert conn.scalar(text("SHOW statement_timeout")) == "2500ms"
    finally:
        db.dispose()
    with psycopg.connect(host=own_pg.host, port=own_pg.port, user=own_pg.user, dbname="postgres") as raw:
        assert raw.execute("SHOW statement_timeout").fetchone() == ("0",)
