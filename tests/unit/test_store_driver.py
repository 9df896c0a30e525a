"""Statements on SQLite's own connection (store/driver.py) store and read values as SQLAlchemy does, and fail
as SQLAlchemy fails: a datetime written by one reads back equal through the other, a busy database is an
OperationalError, a broken constraint an IntegrityError, and nothing of a failed statement stays."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, DateTime, Engine, LargeBinary, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from keysteward.store.driver import DriverStatement

_META = MetaData()
_ROWS = Table(
    "rows",
    _META,
    Column("id", String(36), primary_key=True),
    Column("at", DateTime(timezone=True)),
    Column("blob", LargeBinary),
)
_INSERT = DriverStatement(
    "INSERT INTO rows (id, at, blob) VALUES (:id, :at, :blob)", {"at": DateTime(timezone=True), "blob": LargeBinary()}
)
_READ = DriverStatement(
    "SELECT id, at, blob FROM rows WHERE id = :id", columns=(None, DateTime(timezone=True), LargeBinary())
)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    made = create_engine(f"sqlite:///{tmp_path / 'd.db'}", connect_args={"timeout": 0.05})
    _META.create_all(made)
    return made


_TIMES = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5))]),
)


@settings(max_examples=60, deadline=None)
@given(at=_TIMES, blob=st.binary(max_size=64))
def test_values_written_either_way_read_back_alike(
    tmp_path_factory: pytest.TempPathFactory, at: datetime, blob: bytes
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path_factory.mktemp('d') / 'd.db'}")
    _META.create_all(engine)
    with engine.begin() as conn:
        _INSERT.rows(conn, {"id": "driver", "at": at, "blob": blob})
        conn.execute(insert(_ROWS).values(id="alchemy", at=at, blob=blob))
    with engine.connect() as conn:
        stored = dict(conn.exec_driver_sql("SELECT id, at FROM rows").all())
        assert stored["driver"] == stored["alchemy"]  # the very text SQLAlchemy stores
        for ident in ("driver", "alchemy"):
            by_alchemy = conn.execute(select(_ROWS.c.at, _ROWS.c.blob).where(_ROWS.c.id == ident)).one()
            assert _READ.rows(conn, {"id": ident}) == [(ident, by_alchemy.at, by_alchemy.blob)]
            assert by_alchemy.blob == blob and by_alchemy.at == at.replace(tzinfo=None)  # SQLite keeps no zone


def test_none_and_no_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        assert _INSERT.rows(conn, {"id": "x", "at": None, "blob": None}) == []
        assert _READ.rows(conn, {"id": "x"}) == [("x", None, None)]
        assert _READ.rows(conn, {"id": "absent"}) == []


def test_a_broken_constraint_is_an_integrity_error_and_undoes_nothing_else(engine: Engine) -> None:
    at = datetime.now(UTC)
    with engine.begin() as conn:
        _INSERT.rows(conn, {"id": "x", "at": at, "blob": b"1"})
    with pytest.raises(IntegrityError), engine.begin() as conn:
        _INSERT.rows(conn, {"id": "x", "at": at, "blob": b"2"})
    with engine.connect() as conn:
        assert [row[2] for row in _READ.rows(conn, {"id": "x"})] == [b"1"]


def test_a_busy_database_is_an_operational_error(engine: Engine, tmp_path: Path) -> None:
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


def test_bad_sql_and_bad_parameters_are_errors_of_sqlalchemy(engine: Engine) -> None:
    with engine.connect() as conn:
        with pytest.raises(OperationalError):
            DriverStatement("SELEC nothing").rows(conn, {})
        with pytest.raises(Exception, match="binding"):
            _READ.rows(conn, {})


def test_only_sqlite(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.dialect.name = "postgresql"  # what a PostgreSQL connection says it is
        try:
            with pytest.raises(ValueError, match="SQLite only"):
                _READ.rows(conn, {"id": "x"})
        finally:
            conn.dialect.name = "sqlite"
