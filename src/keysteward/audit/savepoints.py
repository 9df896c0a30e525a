"""Each effect's savepoint in a group-commit batch (:mod:`keysteward.audit.group_commit`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

from keysteward.store.db import Database


class Savepoints:
    """Each effect's savepoint, without ``conn.begin_nested()``'s cost (SQLAlchemy compiles SAVEPOINT and
    RELEASE anew for each one: a fifth of the writer's time in a release run); here they are fixed text run as
    they are. On PostgreSQL an effect's savepoint is released together with the next one's start, in one
    round trip (the text has no parameters, so psycopg sends it by the simple protocol, which allows two
    statements), and the batch's last is released by its commit: one round trip per effect, not two, while
    the batch holds its tenants' chain heads."""

    def __init__(self, conn: Connection, *, merge: bool) -> None:
        self.conn = conn
        self.merge = merge
        self.open = False

    @contextmanager
    def effect(self) -> Iterator[None]:
        if self.open:
            self.conn.exec_driver_sql("RELEASE SAVEPOINT ks_effect; SAVEPOINT ks_effect")
        else:
            self.conn.exec_driver_sql("SAVEPOINT ks_effect")
        self.open = self.merge
        try:
            yield
        except BaseException:
            self.conn.exec_driver_sql("ROLLBACK TO SAVEPOINT ks_effect")
            if not self.merge:
                self.conn.exec_driver_sql("RELEASE SAVEPOINT ks_effect")
            Database.transaction_info(self.conn).clear()  # what the transaction learned, the rollback may have undone
            raise
        if not self.merge:
            self.conn.exec_driver_sql("RELEASE SAVEPOINT ks_effect")
