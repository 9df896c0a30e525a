"""PostgreSQL: a coroutine's audit batch commits on its own event loop while the database answers fast, and on
the writer thread (the loop serving on) from the first batch that was slow or failed there, until a batch
commits fast on the thread again. Played against a real PostgreSQL, with the chain heads of a real
:class:`AuditLog`, and a slow database made by a second session that holds the tenant's chain head."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Connection, text

from keysteward.audit.group_commit import GroupCommit
from keysteward.audit.log import AuditLog, prepare
from keysteward.errors import Unavailable
from keysteward.store.db import Database

pytestmark = pytest.mark.integration
WRITER = "keysteward-audit"


@pytest.fixture
def db(pg_db_with_tenant: Database) -> Database:
    return pg_db_with_tenant


def _group(db: Database, threads: list[str], *, fail: set[str] | None = None) -> GroupCommit:
    """A group commit on a real audit log that notes the thread each batch's append ran on; a record whose
    action is in ``fail`` makes its batch's append raise (a failed batch)."""
    log = AuditLog(db)

    def append(conn: Connection, entries: list[tuple[str, dict[str, Any]]]) -> list[int]:
        threads.append(threading.current_thread().name)
        if fail and any(fields["action"] in fail for _, fields in entries):
            raise Unavailable("the database refused the batch", code="database_unavailable")
        return log.append_many(conn, entries)

    return GroupCommit(db, append, check=lambda details: None, lock=log.lock_heads, prepare=prepare)


def _record(action: str) -> dict[str, Any]:
    return {"actor": "test", "action": action, "target": "t", "outcome": "ok", "reason": "", "details": {}}


def _hold_head(db: Database, seconds: float) -> threading.Thread:
    """A second session that locks tenant a's chain head for ``seconds``, as a slow batch of another server
    does; returned once the lock is held."""
    held = threading.Event()

    def run() -> None:
        with db.write() as conn:
            conn.execute(text("SELECT seq FROM audit_heads WHERE tenant_id = 'a' FOR UPDATE"))
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=run)
    thread.start()
    assert held.wait(10)
    return thread


def _records(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(text("SELECT count(*) FROM audit_records WHERE tenant_id = 'a'")).scalar_one())


def test_batches_commit_on_the_loop_go_to_the_thread_when_slow_and_come_back(db: Database) -> None:
    threads: list[str] = []
    group = _group(db, threads)
    assert group.pg_on_loop

    async def run() -> None:
        loop_thread = threading.current_thread().name
        # one loop turn's callers: one batch, on this loop, in order, in the database when they are told
        seqs = await asyncio.gather(*(group.wait_async("a", _record(f"first{k}"), None) for k in range(4)))
        assert seqs == [1, 2, 3, 4]
        assert threads == [loop_thread]
        assert _records(db) == 4

        # the head held by another session: this batch waits on the loop (which stops), and being slow it
        # sends the next batches to the writer thread
        holder = _hold_head(db, 0.3)
        started = time.monotonic()
        assert await group.wait_async("a", _record("slow"), None) == 5
        assert time.monotonic() - started >= 0.25
        assert threads[-1] == loop_thread
        assert not group.pg_on_loop
        holder.join()

        # held again: now the batch waits on the thread, and the loop serves on meanwhile
        holder = _hold_head(db, 0.5)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while holder.is_alive():
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        assert await group.wait_async("a", _record("on-thread"), None) == 6
        assert threads[-1] == WRITER
        await ticker
        assert ticks >= 20, "the loop stopped while the writer thread waited for the database"
        assert not group.pg_on_loop  # that batch took half a second: still the thread

        # a fast batch on the thread brings the loop back, and the next batch commits on it
        assert await group.wait_async("a", _record("fast-on-thread"), None) == 7
        assert threads[-1] == WRITER
        assert group.pg_on_loop
        assert await group.wait_async("a", _record("back"), None) == 8
        assert threads[-1] == loop_thread

    try:
        asyncio.run(run())
    finally:
        group.close()
    assert _records(db) == 8


def test_a_failed_batch_on_the_loop_fails_its_callers_only_and_sends_the_next_to_the_thread(db: Database) -> None:
    threads: list[str] = []
    group = _group(db, threads, fail={"doomed"})

    async def run() -> None:
        loop_thread = threading.current_thread().name
        with pytest.raises(Unavailable) as caught:
            await group.wait_async("a", _record("doomed"), None)
        assert caught.value.code == "database_unavailable"
        assert threads == [loop_thread]
        assert not group.pg_on_loop
        # the next batch: on the thread, committed (nothing of the failed one), which brings the loop back
        assert await group.wait_async("a", _record("next"), None) == 1
        assert threads[-1] == WRITER
        assert group.pg_on_loop

    try:
        asyncio.run(run())
    finally:
        group.close()
    assert _records(db) == 1
