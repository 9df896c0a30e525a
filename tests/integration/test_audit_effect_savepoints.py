"""Each effect of a group commit runs under its own savepoint: what a refused or failed effect wrote is undone,
while the effects before and after it in the same batch transaction land with their audit records (SQLite and
PostgreSQL, real databases)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select

from keysteward.audit.log import AuditLog
from keysteward.errors import Conflict, Unavailable
from keysteward.store.db import Database
from keysteward.store.models import Tenant

pytestmark = pytest.mark.integration


def _adds(name: str, then: Callable[[Connection], None] | None = None) -> Callable[[Connection], dict[str, Any]]:
    def effect(conn: Connection) -> dict[str, Any]:
        conn.execute(insert(Tenant).values(id=name, name=name, created_at=datetime.now(UTC)))
        if then is not None:
            then(conn)
        return {"actor": "test", "action": f"add.{name}", "target": name}

    return effect


def _refuse(conn: Connection) -> None:
    raise Conflict("refused after its write", code="refused")


def _clash(conn: Connection) -> None:
    conn.execute(insert(Tenant).values(id="a", name="again", created_at=datetime.now(UTC)))  # "a" exists


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_refused_or_failed_effect_is_undone_and_the_batch_goes_on(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}" if engine == "sqlite" else request.getfixturevalue("pg_url")
    db = Database(url)
    db.migrate()
    with db.write() as conn:
        conn.execute(insert(Tenant).values(id="a", name="a", created_at=datetime.now(UTC)))
    log = AuditLog(db)
    effects = {
        "t-ok-1": _adds("t-ok-1"),
        "t-refused": _adds("t-refused", _refuse),
        "t-failed": _adds("t-failed", _clash),
        "t-ok-2": _adds("t-ok-2"),
    }
    results: dict[str, Any] = {}
    start = threading.Barrier(len(effects))

    def run(name: str) -> None:
        start.wait(5)  # together: one batch, or a few
        try:
            results[name] = log.commit("a", effects[name])
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in effects]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(results["t-refused"], Conflict)
    assert isinstance(results["t-failed"], Unavailable) and results["t-failed"].code == "database_unavailable"
    assert isinstance(results["t-ok-1"], int) and isinstance(results["t-ok-2"], int)
    with db.read() as conn:
        names = {r.id for r in conn.execute(select(Tenant.id))}
        actions = [r[0] for r in conn.exec_driver_sql("SELECT body FROM audit_records ORDER BY seq")]
    assert {"t-ok-1", "t-ok-2"} <= names and not names & {"t-refused", "t-failed"}
    assert not any("t-refused" in body or "t-failed" in body for body in actions)
    assert sum("add.t-ok" in body for body in actions) == 2
    log.close()
