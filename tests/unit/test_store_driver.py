"""Statements on the driver's own connection (store/driver.py) store and read values as SQLAlchemy does, and
fail as SQLAlchemy fails, on both engines: a value written by one reads back equal through the other, a busy
SQLite database is an OperationalError, a broken constraint an IntegrityError (on PostgreSQL with its
SQLSTATE, which the group commit's retries read), a dead PostgreSQL connection is invalidated, and nothing
of a failed statement stays."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from keysteward.store.driver import DriverStatement

_META = MetaData()
_ROWS = Table(
    "rows",
    _META,
    Column("id", String(36), primary_key=True),
    Column("at", DateTime(timezone=True)),
    Column("blob", LargeBinary),
)
_UTC = DateTime(timezone=True)
_INSERT = DriverStatement(
    "INSERT INTO rows (id, at, blob) VALUES (:id, :at, :blob)", {"at": _UTC, "blob": LargeBinary()}
)
_READ = DriverStatement("SELECT id, at, blob FROM rows WHERE id = :id", columns=(None, _UTC, LargeBinary()))
_TIMES = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5))]),
)


@pytest.fixture
def engine(db_url: str) -> Engine:
    made = create_engine(db_url, connect_args={"timeout": 0.05} if db_url.startswith("sqlite") else {})
    _META.create_all(made)
    return made


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(at=_TIMES, blob=st.binary(max_size=64))
def test_values_written_either_way_read_back_alike(engine: Engine, at: datetime, blob: bytes) -> None:
    with engine.begin() as conn:
        conn.execute(delete(_ROWS))
        _INSERT.rows(conn, {"id": "driver", "at": at, "blob": blob})
        conn.execute(insert(_ROWS).values(id="alchemy", at=at, blob=blob))
    with engine.connect() as conn:
        stored = dict(conn.exec_driver_sql("SELECT id, CAST(at AS TEXT) FROM rows").all())
        assert stored["driver"] == stored["alchemy"]  # the very text SQLAlchemy stores
        for ident in ("driver", "alchemy"):
            by_alchemy = conn.execute(select(_ROWS.c.at, _ROWS.c.blob).where(_ROWS.c.id == ident)).one()
            assert _READ.rows(conn, {"id": ident}) == [(ident, by_alchemy.at, by_alchemy.blob)]
            assert bytes(by_alchemy.blob) == blob
            if engine.dialect.name == "sqlite":
                assert by_alchemy.at == at.replace(tzinfo=None)  # SQLite keeps no zone
            else:
                assert by_alchemy.at == at


def test_none_and_no_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        assert _INSERT.rows(conn, {"id": "x", "at": None, "blob": None}) == []
        assert _READ.rows(conn, {"id": "x"}) == [("x", None, None)]
        assert _READ.rows(conn, {"id": "absent"}) == []


def test_a_broken_constraint_is_an_integrity_error_and_undoes_nothing_else(engine: Engine) -> None:
    at = datetime.now(UTC)
    with engine.begin() as conn:
        _INSERT.rows(conn, {"id": "x", "at": at, "blob": b"1"})
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        _INSERT.rows(conn, {"id": "x", "at": at, "blob": b"2"})
    if engine.dialect.name == "postgresql":
        assert caught.value.orig.sqlstate == "23505"  # type: ignore[union-attr]
    with engine.connect() as conn:
        assert [bytes(row[2]) for row in _READ.rows(conn, {"id": "x"})] == [b"1"]


def test_a_percent_sign_is_text_not_a_parameter(engine: Engine) -> None:
    like = DriverStatement("SELECT id FROM rows WHERE id LIKE 'a%' AND id <> :id")
    with engine.begin() as conn:
        for ident in ("ab", "ac", "b"):
            _INSERT.rows(conn, {"id": ident, "at": None, "blob": None})
        assert sorted(like.rows(conn, {"id": "ac"})) == [("ab",)]


def test_a_busy_sqlite_database_is_an_operational_error(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'd.db'}", connect_args={"timeout": 0.05})
    _META.create_all(engine)
    holder = sqlite3.connect(tmp_path / "d.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError, match="locked"), engine.begin() as conn:
            _INSERT.rows(conn, {"id": "y", "at": datetime.now(UTC), "blob": b""})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with engine.connect() as conn:
        assert _READ.rows(conn, {"id": "y"}) == []


@pytest.mark.integration
def test_a_dead_postgresql_connection_is_invalidated(pg_url: str) -> None:
    engine = create_engine(pg_url)
    _META.create_all(engine)
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as caught:
            _READ.rows(conn, {"id": "x"})
        assert caught.value.connection_invalidated and conn.invalidated
    with engine.connect() as conn:  # the pool made a new connection
        assert _READ.rows(conn, {"id": "x"}) == []


def test_bad_sql_and_bad_parameters_are_errors_of_sqlalchemy(engine: Engine) -> None:
    with engine.connect() as conn:
        with pytest.raises(DBAPIError):
            DriverStatement("SELEC nothing").rows(conn, {})
    with engine.connect() as conn, pytest.raises((DBAPIError, KeyError)):
        _READ.rows(conn, {})
