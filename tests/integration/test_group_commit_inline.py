"""SQLite: a coroutine's record commits on its own event loop when the write lock is free, and waits there
(the loop serving on) while another process holds the lock, however long; every caller gets its sequence
number, in order, and the records are in the database once the callers return. A caller that gave up waiting
is left out of the batch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection

from keysteward.audit import group_commit
from keysteward.audit.group_commit import BATCH, GroupCommit
from keysteward.errors import Unavailable
from keysteward.store.db import Database, WriteLockBusy

pytestmark = pytest.mark.integration

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
fcntl.flock(fd, fcntl.LOCK_UN)
"""


def _hold_lock(db_path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that takes the database's write lock for ``seconds``, as another server worker does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, f"{db_path}.writelock", str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _group(db: Database, committed: list[tuple[str, str]]) -> GroupCommit:
    def append(conn: Connection, records: list[tuple[str, dict[str, Any]]]) -> list[int]:
        start = len(committed)
        for _tenant, fields in records:
            conn.exec_driver_sql("INSERT INTO marks (n) VALUES (?)", (fields["n"],))
            committed.append((fields["n"], threading.current_thread().name))
        return [start + i + 1 for i in range(len(records))]

    return GroupCommit(db, append, check=lambda details: None)


def _marks_db(path: Path) -> Database:
    db = Database(f"sqlite:///{path}")
    with db.write() as conn:
        conn.exec_driver_sql("CREATE TABLE marks (n TEXT)")
    return db


def _marks(db: Database) -> list[str]:
    with db.read() as conn:
        return [row[0] for row in conn.exec_driver_sql("SELECT n FROM marks ORDER BY rowid")]


def test_records_commit_on_the_loop_and_wait_there_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "inline.db"
    db = _marks_db(path)
    committed: list[tuple[str, str]] = []
    group = _group(db, committed)
    assert db.can_try_write

    async def run() -> None:
        loop_thread = threading.current_thread().name
        # one loop turn's callers: one batch, committed on this loop's thread
        seqs = await asyncio.gather(*(group.wait_async("t", {"n": f"a{k}"}, None) for k in range(5)))
        assert seqs == [1, 2, 3, 4, 5]
        assert {name for _, name in committed} == {loop_thread}
        assert _marks(db) == [f"a{k}" for k in range(5)]  # in the database when the callers are told

        # another process holds the lock briefly: committed on the loop once it is free
        holder = _hold_lock(path, 0.05)
        started = time.monotonic()
        assert await group.wait_async("t", {"n": "brief"}, None) == 6
        assert time.monotonic() - started >= 0.045
        assert committed[-1] == ("brief", loop_thread)
        holder.wait(10)

        # held for a second: the batch still waits on the loop (never on a thread starved of the GIL by the
        # loop, holding the lock the longer), and the loop serves on meanwhile
        holder = _hold_lock(path, 1.0)
        started = time.monotonic()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while holder.poll() is None:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        long_wait = [group.wait_async("t", {"n": f"long{k}"}, None) for k in range(3)]
        assert await asyncio.gather(*long_wait) == [7, 8, 9]
        assert time.monotonic() - started >= 0.9
        assert [name for _, name in committed[-3:]] == [loop_thread] * 3
        await ticker
        assert ticks >= 30, "the loop stopped while its batch waited for the lock"
        holder.wait(10)

        # the lock free again: at once, on the loop
        assert await group.wait_async("t", {"n": "after"}, None) == 10
        assert committed[-1] == ("after", loop_thread)

    try:
        asyncio.run(run())
    finally:
        group.close()
        db.dispose()
    assert [n for n, _ in committed] == [*(f"a{k}" for k in range(5)), "brief", "long0", "long1", "long2", "after"]


def test_a_caller_told_the_record_could_not_be_written_is_never_committed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that gave up waiting (503, not carried out) while another process held the lock: its change
    and record are left out of the batch that runs once the lock is free, so what it was told stays true."""
    path = tmp_path / "abandoned.db"
    db = _marks_db(path)
    committed: list[tuple[str, str]] = []
    group = _group(db, committed)
    effects: list[str] = []

    def effect(conn: Connection) -> dict[str, Any]:
        effects.append("ran")
        conn.exec_driver_sql("INSERT INTO marks (n) VALUES ('effect')")
        return {"n": "gave-up"}

    async def run() -> None:
        holder = _hold_lock(path, 0.6)
        monkeypatch.setattr(group_commit, "WAIT_SECONDS", 0.2)
        with pytest.raises(Unavailable) as refused:
            await group.wait_async("t", {}, effect)
        assert refused.value.code == "audit_unavailable"
        monkeypatch.setattr(group_commit, "WAIT_SECONDS", 30.0)
        assert await group.wait_async("t", {"n": "later"}, None) == 1  # waits for the holder, then commits
        holder.wait(10)

    try:
        asyncio.run(run())
    finally:
        group.close()
        db.dispose()
    assert effects == []
    assert [n for n, _ in committed] == ["later"]
    assert _marks(db) == ["later"]


def test_a_write_that_must_not_wait_finds_the_lock_busy_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    db = Database(f"sqlite:///{path}")
    with db.write() as conn:
        conn.exec_driver_sql("CREATE TABLE marks (n TEXT)")
    holder = _hold_lock(path, 5)
    try:
        with pytest.raises(WriteLockBusy), db.write(keep=True, wait=False) as conn:
            conn.exec_driver_sql("INSERT INTO marks (n) VALUES ('never')")
        with pytest.raises(WriteLockBusy), db.write(wait=False) as conn:
            conn.exec_driver_sql("INSERT INTO marks (n) VALUES ('never')")
    finally:
        holder.kill()
        holder.wait(10)
    with db.write(wait=False) as conn:
        conn.exec_driver_sql("INSERT INTO marks (n) VALUES ('now')")
    assert _marks(db) == ["now"]
    db.dispose()


def _batches_of(path: Path, run: Callable[[GroupCommit], Coroutine[Any, Any, None]]) -> list[list[str]]:
    """The batches a group commit made of the records ``run`` handed it, each as its records' ``n``."""
    db = Database(f"sqlite:///{path}")
    batches: list[list[str]] = []

    def append(conn: Connection, records: list[tuple[str, dict[str, Any]]]) -> list[int]:
        batches.append([fields["n"] for _, fields in records])
        return list(range(len(records)))

    group = GroupCommit(db, append, check=lambda details: None)
    try:
        asyncio.run(run(group))
    finally:
        group.close()
        db.dispose()
    return batches


def test_a_loop_turn_of_more_than_a_batch_commits_renewals_first(tmp_path: Path) -> None:
    async def run(group: GroupCommit) -> None:
        waiting = [group.wait_async("t", {"n": f"r{k}"}, None) for k in range(BATCH + 10)]
        waiting += [group.wait_async("t", {"n": f"renew{k}"}, None, first=True) for k in range(3)]
        await asyncio.gather(*waiting)

    batches = _batches_of(tmp_path / "first.db", run)
    assert len(batches) == 2 and len(batches[0]) == BATCH
    assert batches[0][:3] == ["renew0", "renew1", "renew2"]  # ahead of the loop turn's releases
    assert batches[0][3:] + batches[1] == [f"r{k}" for k in range(BATCH + 10)]  # the others in their order


def test_callers_of_the_next_loop_turn_join_the_batch(tmp_path: Path) -> None:
    """A batch waits one more loop turn: requests whose data came in with the first caller's reach their commit
    a turn later, and share its transaction and fsync (batches of one turn held half as many records)."""

    async def run(group: GroupCommit) -> None:
        loop = asyncio.get_running_loop()
        first = [loop.create_task(group.wait_async("t", {"n": f"a{k}"}, None)) for k in range(3)]
        await asyncio.sleep(0)  # the three hand their records over in this turn
        second = [loop.create_task(group.wait_async("t", {"n": f"b{k}"}, None)) for k in range(3)]
        await asyncio.sleep(0)  # these in the next one
        third = [loop.create_task(group.wait_async("t", {"n": f"c{k}"}, None)) for k in range(2)]
        await asyncio.gather(*first, *second, *third)

    assert _batches_of(tmp_path / "turns.db", run) == [["a0", "a1", "a2", "b0", "b1", "b2"], ["c0", "c1"]]
