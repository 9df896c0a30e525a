"""Two servers' group commits that lock rows in opposite orders on PostgreSQL: a real deadlock.

PostgreSQL kills one statement; its effect is undone by its savepoint and runs again first in the
next transaction, so both changes and both audit records land and no caller sees a 503.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select, update

from keysteward.audit.log import AuditLog
from keysteward.store.db import Database
from keysteward.store.models import Tenant

pytestmark = pytest.mark.integration


def test_a_deadlocked_effect_is_retried_in_the_next_transaction(pg_url: str) -> None:
    one, two = Database(pg_url), Database(pg_url)
    one.migrate()
    with one.write() as conn:
        for name in ("a", "b"):
            conn.execute(insert(Tenant).values(id=name, name=name, created_at=datetime.now(UTC)))
    logs = AuditLog(one), AuditLog(two)
    both_locked_first = threading.Barrier(2)

    def locking(first: str, second: str) -> Any:
        def effect(conn: Connection) -> dict[str, Any]:
            conn.execute(select(Tenant.id).where(Tenant.id == first).with_for_update())
            try:
                both_locked_first.wait(timeout=5)  # the first attempt of each: both hold one row
            except threading.BrokenBarrierError:
                pass  # the retry: the other transaction is gone
            time.sleep(0.05)
            conn.execute(select(Tenant.id).where(Tenant.id == second).with_for_update())
            conn.execute(update(Tenant).where(Tenant.id == second).values(name=f"{second}-by-{first}"))
            return {"actor": "test", "action": f"lock.{first}{second}", "target": second}

        return effect

    results: dict[str, Any] = {}

    def run(log: AuditLog, first: str, second: str) -> None:
        try:
            results[first] = log.commit("a", locking(first, second))
        except Exception as exc:
            results[first] = exc

    threads = [
        threading.Thread(target=run, args=(logs[0], "a", "b")),
        threading.Thread(target=run, args=(logs[1], "b", "a")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert all(isinstance(v, int) for v in results.values()), results
        assert len(results) == 2
        with one.read() as conn:
            names = dict(conn.execute(select(Tenant.id, Tenant.name)).all())
        assert names == {"a": "a-by-b", "b": "b-by-a"}
        actions = [link.body for link in logs[0].links("a")]
        assert len(actions) == 2 and any("lock.ab" in b for b in actions) and any("lock.ba" in b for b in actions)
    finally:
        for log in logs:
            log.close()
        one.dispose()
        two.dispose()
