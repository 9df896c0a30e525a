"""Fixed statements run on the driver's own connection, past SQLAlchemy's execution.

For a short statement, SQLAlchemy's execution (the execution context, the compiled-cache lookup, events,
the result wrapping) costs several times what the driver takes to run it: on SQLite, in a release's
transaction, a tenth of the server's CPU went to that for its statements, against a fortieth for sqlite3
itself; on PostgreSQL it was 45% of the audit writer thread's Python time for a release's one statement.
A :class:`DriverStatement` is fixed SQL text with named parameters (``:name``), run by the driver
connection (sqlite3, psycopg) of the caller's SQLAlchemy connection, inside its transaction. What
SQLAlchemy would do with the values is kept: each parameter and result column goes through its column
type's own processor for that dialect (on SQLite a datetime is stored in the very form SQLAlchemy stores
it, and read back as SQLAlchemy reads it), a driver error is wrapped as SQLAlchemy wraps it (a busy
SQLite database is an ``OperationalError``, which :class:`keysteward.store.db.Database` answers with
``database_unavailable``; a PostgreSQL error keeps its SQLSTATE for the group commit's retries), and a
connection the error shows dead is invalidated, so the pool drops it. :func:`driver_cursor` is that
cursor and that error handling, for code that runs its own statements there (the audit log's appends).
:func:`pipelined` runs several statements in one PostgreSQL pipeline: one round trip for all of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeEngine

Processor = Callable[[Any], Any] | None
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


class DriverStatement:
    def __init__(
        self,
        sql: str,
        binds: Mapping[str, TypeEngine[Any]] | None = None,
        columns: Sequence[TypeEngine[Any] | None] = (),
    ) -> None:
        """``binds`` names the parameters whose values a type converts; ``columns`` gives the type of each
        result column by position (None: as the driver returns it)."""
        self.sql = sql
        self._binds = dict(binds or {})
        self._columns = tuple(columns)
        self._made: dict[str, _Made] = {}

    def rows(self, conn: Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The statement's result rows (none for a statement that returns none). What :func:`driver_cursor`
        does, written out: its two context managers were a third of this call's own time."""
        made = self._made.get(conn.dialect.name) or self._make(conn)
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()
        try:
            cursor.execute(made.sql, made.params(values))
            return made.result(cursor)
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, raw, self.sql, cursor, exc) from exc
        finally:
            cursor.close()

    def _make(self, conn: Connection) -> _Made:
        dialect = conn.dialect
        sql = self.sql
        if dialect.paramstyle == "pyformat":  # psycopg: %(name)s
            sql = _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))
        binds = {name: kind.dialect_impl(dialect).bind_processor(dialect) for name, kind in self._binds.items()}
        columns = tuple(
            None if kind is None else kind.dialect_impl(dialect).result_processor(dialect, None)
            for kind in self._columns
        )
        made = _Made(sql, {name: bind for name, bind in binds.items() if bind is not None}, columns, any(columns))
        self._made[dialect.name] = made
        return made


Fetch = tuple[DriverStatement, Mapping[str, Any]]
"""A statement and its values, to be run with others by :func:`pipelined`."""


def pipelined(conn: Connection, statements: Sequence[Fetch]) -> list[list[tuple[Any, ...]]]:
    """Each statement's rows, the statements run in order in the caller's transaction. On PostgreSQL they
    leave in one pipeline: one round trip for all of them (and for the ``BEGIN`` before them, when they open
    the transaction) instead of one each. A statement that fails aborts the rest of the pipeline; the error
    is raised as :meth:`DriverStatement.rows` raises it, and the transaction is left failed."""
    if conn.dialect.name != "postgresql" or len(statements) < 2:
        return [statement.rows(conn, values) for statement, values in statements]
    raw = conn.connection.dbapi_connection
    assert raw is not None
    made = [statement._made.get("postgresql") or statement._make(conn) for statement, _ in statements]
    cursors = [raw.cursor() for _ in statements]
    try:
        with _translated(conn, raw, statements[0][0].sql), raw.pipeline():
            for cursor, how, (_, values) in zip(cursors, made, statements, strict=True):
                cursor.execute(how.sql, how.params(values))
        return [how.result(cursor) for how, cursor in zip(made, cursors, strict=True)]
    finally:
        for cursor in cursors:
            cursor.close()


@contextmanager
def driver_cursor(conn: Connection, statement: str = "") -> Iterator[Any]:
    """A cursor of the driver connection under ``conn``, in its transaction. A driver error raised while it is
    used becomes SQLAlchemy's ``DBAPIError`` for it (naming ``statement``, never the values), and a connection
    the error shows dead is invalidated first, as SQLAlchemy does for its own statements."""
    raw = conn.connection.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        with _translated(conn, raw, statement, cursor):
            yield cursor
    finally:
        cursor.close()


@contextmanager
def _translated(conn: Connection, raw: Any, statement: str, cursor: Any = None) -> Iterator[None]:
    """A driver error as SQLAlchemy's ``DBAPIError`` (see :func:`driver_cursor`)."""
    try:
        yield
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, raw, statement, cursor, exc) from exc


def _wrapped(conn: Connection, raw: Any, statement: str, cursor: Any, exc: Any) -> Exception:
    """SQLAlchemy's error for a driver's ``exc``, the connection invalidated first when it shows it dead."""
    invalidated = conn.dialect.is_disconnect(exc, raw, cursor)
    if invalidated:
        conn.invalidate(exc)
    error: type[Exception] = conn.dialect.loaded_dbapi.Error
    wrapped: Exception = DBAPIError.instance(statement, None, exc, error, connection_invalidated=invalidated)
    return wrapped


@dataclass(frozen=True)
class _Made:
    """A statement as one dialect's driver runs it."""

    sql: str
    binds: dict[str, Processor]
    columns: tuple[Processor, ...]

    converts: bool
    """Whether a result column goes through a processor."""

    def params(self, values: Mapping[str, Any]) -> Mapping[str, Any]:
        binds = self.binds
        if not binds:
            return values
        return {name: _apply(binds.get(name), value) for name, value in values.items()}

    def result(self, cursor: Any) -> list[tuple[Any, ...]]:
        fetched: list[tuple[Any, ...]] = list(cursor.fetchall()) if cursor.description is not None else []
        if not self.converts:
            return fetched
        return [tuple(_apply(p, v) for p, v in zip(self.columns, row, strict=False)) for row in fetched]


def _apply(processor: Processor, value: Any) -> Any:
    return value if processor is None or value is None else processor(value)
