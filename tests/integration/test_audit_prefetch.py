"""Effects whose writes are one statement, sent ahead with the chain-head lock in one pipeline (PostgreSQL).

A batch's leading run of such effects runs on the rows their statements returned; each statement still sees
what the ones before it wrote, an effect with other writes ends the run (those after it run their own
statements, after its writes), and a statement that fails rolls the batch back and runs it again, each
effect on its own: the others land with their records, the failed one alone is refused.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select

from keysteward.audit.group_commit import GroupCommit
from keysteward.audit.log import AuditLog, prepare
from keysteward.audit.pending import Pending
from keysteward.errors import Unavailable
from keysteward.store.db import Database
from keysteward.store.driver import DriverStatement, Fetch
from keysteward.store.models import Tenant

pytestmark = pytest.mark.integration

_ADD = DriverStatement(
    "INSERT INTO tenants (id, name, created_at) VALUES (:id, :id, :at) RETURNING (SELECT count(*) FROM tenants)"
)
"""Adds a tenant and says how many there were before: what the statement saw of the batch's earlier writes."""


class _Adds:
    """A prefetching effect: its one write is ``_ADD``; says how it ran and what its statement saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ran: list[tuple[str, int]] = []

    def prefetch(self) -> Fetch:
        return _ADD, {"id": self.name, "at": datetime.now(UTC)}

    def fetched(self, conn: Connection, rows: list[Any]) -> dict[str, Any]:
        return self._record("ahead", rows)

    def __call__(self, conn: Connection) -> dict[str, Any]:
        statement, values = self.prefetch()
        return self._record("alone", statement.rows(conn, values))

    def _record(self, how: str, rows: list[Any]) -> dict[str, Any]:
        self.ran.append((how, rows[0][0]))
        return {"actor": "test", "action": f"add.{self.name}", "target": self.name}


def _plain_add(name: str) -> Any:
    def effect(conn: Connection) -> dict[str, Any]:
        conn.execute(insert(Tenant).values(id=name, name=name, created_at=datetime.now(UTC)))
        return {"actor": "test", "action": f"add.{name}", "target": name}

    return effect


def _one_batch(db: Database, log: AuditLog, effects: list[Any]) -> list[Any]:
    """Run ``effects`` as one batch, in this order: the writer is held by a first batch while they queue."""
    group = GroupCommit(db, log.append_many, check=lambda details: None, lock=log.lock_heads, prepare=prepare)
    held, release = threading.Event(), threading.Event()

    def holding(conn: Connection) -> dict[str, Any]:
        held.set()
        release.wait(10)
        return {"actor": "test", "action": "hold", "target": "writer"}

    first = group.enqueue(Pending("a", {}, effect=holding))
    assert held.wait(10)
    queued = [group.enqueue(Pending("a", {}, effect=effect)) for effect in effects]
    release.set()
    results: list[Any] = []
    try:
        group.wait(first)
        for pending in queued:
            try:
                results.append(group.wait(pending))
            except Exception as exc:  # the test looks at what each caller got
                results.append(exc)
    finally:
        group.close()
    return results


@pytest.fixture
def db(pg_db_with_tenant: Database) -> Database:
    return pg_db_with_tenant


def test_a_leading_run_of_statements_goes_ahead_and_each_sees_the_writes_before_it(db: Database) -> None:
    log = AuditLog(db)
    one, two, after = _Adds("t1"), _Adds("t2"), _Adds("t4")
    results = _one_batch(db, log, [one, two, _plain_add("t3"), after])
    assert all(isinstance(r, int) for r in results), results
    assert results == sorted(results)  # recorded in the batch's order
    assert one.ran == [("ahead", 1)] and two.ran == [("ahead", 2)]
    # after an effect with writes of its own: its own statement, which sees that effect's tenant
    assert after.ran == [("alone", 4)]
    with db.read() as conn:
        names = {r.id for r in conn.execute(select(Tenant.id))}
        bodies = [r[0] for r in conn.exec_driver_sql("SELECT body FROM audit_records ORDER BY seq")]
    assert names == {"a", "t1", "t2", "t3", "t4"}
    assert [next(n for n in ("t1", "t2", "t3", "t4") if f"add.{n}" in b) for b in bodies[1:]] == [
        "t1",
        "t2",
        "t3",
        "t4",
    ]
    log.close()


def test_a_failing_statement_sent_ahead_fails_alone_and_the_batch_runs_again(db: Database) -> None:
    log = AuditLog(db)
    one, clash, two = _Adds("t1"), _Adds("a"), _Adds("t2")  # tenant "a" exists: a unique violation
    results = _one_batch(db, log, [one, clash, two])
    assert isinstance(results[0], int) and isinstance(results[2], int)
    assert isinstance(results[1], Unavailable) and results[1].code == "database_unavailable"
    # the pipelined run was rolled back whole; the run again made each statement on its own
    assert one.ran == [("alone", 1)] and two.ran == [("alone", 2)] and clash.ran == []
    with db.read() as conn:
        names = sorted(r.id for r in conn.execute(select(Tenant.id)))
        bodies = [r[0] for r in conn.exec_driver_sql("SELECT body FROM audit_records ORDER BY seq")]
    assert names == ["a", "t1", "t2"]
    assert sum("add.t" in b for b in bodies) == 2 and not any("add.a" in b for b in bodies)
    log.close()
