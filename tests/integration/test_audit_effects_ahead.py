"""Effects that send their statement ahead (PostgreSQL): consecutive ones leave in one pipeline, each then
reads its own answer; one that fails, in its statement or after it, undoes the whole batch transaction,
which runs again with a savepoint per effect, so only the failed one is lost (real PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select

from keysteward.audit.log import AuditLog
from keysteward.errors import Conflict, Unavailable
from keysteward.store.db import Database
from keysteward.store.models import Tenant

pytestmark = pytest.mark.integration
_INSERT = "INSERT INTO tenants (id, name, created_at) VALUES (%(id)s, %(id)s, now()) RETURNING id"


class _Adds:
    """Adds tenant ``name``: its INSERT sent ahead when the batch pipelines it, else run by the effect."""

    def __init__(self, name: str, *, then: Callable[[], None] | None = None) -> None:
        self.name = name
        self.then = then
        self.sent = 0
        self.ran_itself = 0

    def ahead(self, conn: Connection) -> None:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()
        cursor.execute(_INSERT, {"id": self.name})
        Database.transaction_info(conn)[("ahead", self.name)] = cursor
        self.sent += 1

    def effect(self, conn: Connection) -> dict[str, Any]:
        cursor = Database.transaction_info(conn).pop(("ahead", self.name), None)
        if cursor is None:
            self.ran_itself += 1
            conn.execute(insert(Tenant).values(id=self.name, name=self.name, created_at=_now(conn)))
        else:
            assert cursor.fetchone() == (self.name,)
        if self.then is not None:
            self.then()
        return {"actor": "test", "action": f"add.{self.name}", "target": self.name}


def _now(conn: Connection) -> Any:
    return conn.exec_driver_sql("SELECT now()").scalar_one()


def _refuse() -> None:
    raise Conflict("refused after its write", code="refused")


def test_pipelined_effects_land_and_a_failed_one_is_undone_alone(pg_url: str) -> None:
    db = Database(pg_url)
    db.migrate()
    with db.write() as conn:
        conn.execute(insert(Tenant).values(id="taken", name="taken", created_at=_now(conn)))
    log = AuditLog(db)
    release = threading.Event()

    def hold(conn: Connection) -> dict[str, Any]:  # keeps the writer busy while the others queue up behind it
        release.wait(10)
        return {"actor": "test", "action": "hold", "target": "hold"}

    adds = {
        name: _Adds(name, then=_refuse if name == "refused" else None)
        for name in ("ok-1", "ok-2", "refused", "ok-3", "taken", "ok-4")
    }
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        try:
            if name == "hold":
                results[name] = log.commit("a", hold)
            else:
                results[name] = log.commit("a", adds[name].effect, ahead=adds[name].ahead)
        except Exception as exc:
            results[name] = exc

    holder = threading.Thread(target=run, args=("hold",))
    holder.start()
    threads = []
    for name in adds:  # queued in this order behind the held batch: the next batch takes them all
        threads.append(threading.Thread(target=run, args=(name,)))
        threads[-1].start()
        while not any(p for p in log._group._queue if p.ahead == adds[name].ahead):
            threading.Event().wait(0.005)
    release.set()
    for t in [holder, *threads]:
        t.join(30)
    try:
        assert isinstance(results["hold"], int)
        assert isinstance(results["refused"], Conflict)
        assert isinstance(results["taken"], Unavailable) and results["taken"].code == "database_unavailable"
        assert all(isinstance(results[f"ok-{i}"], int) for i in range(1, 5)), results
        # the batch was pipelined first (every effect's statement sent ahead), then undone and run guarded
        assert all(add.sent == 1 for add in adds.values()), {n: a.sent for n, a in adds.items()}
        assert all(add.ran_itself == 1 for name, add in adds.items() if name != "taken")
        with db.read() as conn:
            names = {r.id for r in conn.execute(select(Tenant.id))}
            bodies = [r[0] for r in conn.exec_driver_sql("SELECT body FROM audit_records ORDER BY seq")]
        assert {f"ok-{i}" for i in range(1, 5)} <= names and "refused" not in names
        assert sum("add.ok-" in body for body in bodies) == 4
        assert not any("add.refused" in body or "add.taken" in body for body in bodies)
    finally:
        log.close()
        db.dispose()


def test_pipelined_effects_that_all_pass_need_no_second_run(pg_url: str) -> None:
    db = Database(pg_url)
    db.migrate()
    log = AuditLog(db)
    release = threading.Event()

    def hold(conn: Connection) -> dict[str, Any]:
        release.wait(10)
        return {"actor": "test", "action": "hold", "target": "hold"}

    adds = [_Adds(f"t-{i}") for i in range(8)]
    results: list[Any] = []
    holder = threading.Thread(target=lambda: results.append(log.commit("a", hold)))
    holder.start()
    threads = []
    for add in adds:
        threads.append(threading.Thread(target=lambda a=add: results.append(log.commit("a", a.effect, ahead=a.ahead))))
        threads[-1].start()
        while not any(p for p in log._group._queue if p.ahead == add.ahead):
            threading.Event().wait(0.005)
    release.set()
    for t in [holder, *threads]:
        t.join(30)
    try:
        assert len(results) == 9 and all(isinstance(r, int) for r in results)
        assert all(add.sent == 1 and add.ran_itself == 0 for add in adds)  # one pipeline, read from it
        with db.read() as conn:
            names = {r.id for r in conn.execute(select(Tenant.id))}
        assert {add.name for add in adds} <= names
    finally:
        log.close()
        db.dispose()
