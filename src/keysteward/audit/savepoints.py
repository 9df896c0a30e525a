"""Each effect's savepoint in a group-commit batch (:mod:`keysteward.audit.group_commit`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

from keysteward.store.db import Database
from keysteward.store.driver import DriverStatement


class Savepoints:
    """Each effect's savepoint, without ``conn.begin_nested()``'s cost (SQLAlchemy compiles SAVEPOINT and
    RELEASE anew for each one: a fifth of the writer's time in a release run); here they are fixed text run as
    they are. On PostgreSQL an effect's savepoint is released together with the next one's start, in one
    round trip (the text has no parameters, so psycopg sends it by the simple protocol, which allows two
    statements), and the batch's last is released by its commit: one round trip per effect, not two, while
    the batch holds its tenants' chain heads. On SQLite they run on the driver's connection
    (:mod:`keysteward.store.driver`)."""

    def __init__(self, conn: Connection, *, merge: bool) -> None:
        self.conn = conn
        self.merge = merge
        self.open = False

    @contextmanager
    def effect(self) -> Iterator[None]:
        if self.open:
            self.conn.exec_driver_sql("RELEASE SAVEPOINT ks_effect; SAVEPOINT ks_effect")
        else:
            self._run(_SAVEPOINT)
        self.open = self.merge
        try:
            yield
        except BaseException:
            self._run(_ROLLBACK)
            if not self.merge:
                self._run(_RELEASE)
            Database.transaction_info(self.conn).clear()  # what the transaction learned, the rollback may have undone
            raise
        if not self.merge:
            self._run(_RELEASE)

    def _run(self, statement: DriverStatement) -> None:
        """On SQLite (never merged) on the driver's connection; on PostgreSQL through SQLAlchemy."""
        if self.merge:
            self.conn.exec_driver_sql(statement.sql)
        else:
            statement.rows(self.conn, {})


_SAVEPOINT = DriverStatement("SAVEPOINT ks_effect")
_ROLLBACK = DriverStatement("ROLLBACK TO SAVEPOINT ks_effect")
_RELEASE = DriverStatement("RELEASE SAVEPOINT ks_effect")
