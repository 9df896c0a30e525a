"""Fixed statements run on SQLite's own connection, past SQLAlchemy's execution.

For a short statement on a local file, SQLAlchemy's execution (the execution context, the compiled-cache
lookup, events, the result wrapping) costs several times what sqlite3 takes to run it: in a release's
transaction, a tenth of the server's CPU went to that for its statements, against a fortieth for
sqlite3 itself. A :class:`DriverStatement` is fixed SQL text with named parameters, run by the sqlite3
connection of the caller's SQLAlchemy connection, inside its transaction. What SQLAlchemy would do with
the values is kept: each parameter and result column goes through its column type's own processor (a
datetime is stored in the very form SQLAlchemy stores it, and read back as SQLAlchemy reads it), and a
driver error is wrapped as SQLAlchemy wraps it (a busy database is an ``OperationalError``, which
:class:`keysteward.store.db.Database` answers with ``database_unavailable``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeEngine

Processor = Callable[[Any], Any] | None


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
        self._ready: tuple[dict[str, Processor], tuple[Processor, ...]] | None = None

    def rows(self, conn: Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The statement's result rows (none for a statement without RETURNING)."""
        if conn.dialect.name != "sqlite":
            raise ValueError("a DriverStatement runs on SQLite only")
        binds, columns = self._processors(conn)
        params = {name: _apply(binds.get(name), value) for name, value in values.items()}
        raw = conn.connection.dbapi_connection
        assert raw is not None
        try:
            fetched: list[tuple[Any, ...]] = raw.execute(self.sql, params).fetchall()
        except sqlite3.Error as exc:
            raise DBAPIError.instance(self.sql, params, exc, sqlite3.Error) from exc
        if not any(columns):
            return fetched
        return [tuple(_apply(p, v) for p, v in zip(columns, row, strict=False)) for row in fetched]

    def _processors(self, conn: Connection) -> tuple[dict[str, Processor], tuple[Processor, ...]]:
        if self._ready is None:  # one dialect per process: SQLite's
            dialect = conn.dialect
            binds: dict[str, Processor] = {
                name: kind.dialect_impl(dialect).bind_processor(dialect) for name, kind in self._binds.items()
            }
            columns: tuple[Processor, ...] = tuple(
                None if kind is None else kind.dialect_impl(dialect).result_processor(dialect, None)
                for kind in self._columns
            )
            self._ready = binds, columns
        return self._ready


def _apply(processor: Processor, value: Any) -> Any:
    return value if processor is None or value is None else processor(value)
