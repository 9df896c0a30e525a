"""Waiting on the event loop for an audit record's commit: the caller gets its sequence number once the batch
commits, ``audit_unavailable`` when the commit does not come within the wait (and its record is then never
committed), and a cancelled caller leaves the writer and the other callers unharmed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection

from keysteward.audit import group_commit
from keysteward.audit.group_commit import GroupCommit
from keysteward.audit.pending import Pending
from keysteward.errors import Unavailable
from keysteward.store.db import Database
from tests.integration.test_group_commit_order import held_batch

pytestmark = pytest.mark.integration


def test_a_coroutine_waits_for_its_commit_and_gives_up_when_it_does_not_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path}/wait.db")
    appended: list[str] = []

    def append(conn: Connection, records: list[tuple[str, dict[str, Any]]]) -> list[int]:
        appended.extend(fields["n"] for _, fields in records)
        return [len(appended) - len(records) + i + 1 for i in range(len(records))]

    group = GroupCommit(db, append, check=lambda details: None)
    holding, release, hold = held_batch()

    async def run() -> None:
        assert await group.wait_async("t", {"n": "a"}, None) == 1
        blocker = group.enqueue(Pending("t", {}, effect=hold))
        assert await asyncio.to_thread(holding.wait, 10)  # the writer is stuck inside a batch
        monkeypatch.setattr(group_commit, "WAIT_SECONDS", 0.2)
        with pytest.raises(Unavailable) as late:
            await group.wait_async("t", {"n": "late"}, None)
        assert late.value.code == "audit_unavailable"
        cancelled = asyncio.ensure_future(group.wait_async("t", {"n": "cancelled"}, None))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        monkeypatch.setattr(group_commit, "WAIT_SECONDS", 10.0)
        waiting = asyncio.ensure_future(group.wait_async("t", {"n": "b"}, None))
        release.set()
        # the writer went on after both callers left; what they were told stays true: their records are left
        # out, and b commits on this loop once the lock is free
        assert await waiting == 3
        assert cancelled.cancelled()
        assert await asyncio.to_thread(group.wait, blocker) == 2

    try:
        asyncio.run(run())
    finally:
        group.close()
        db.dispose()
    assert appended == ["a", "held", "b"]
