"""SQLite: a coroutine's record commits on its own event loop when the write lock is free, waits there while
another process holds the lock briefly, and goes to the writer thread when the lock stays taken; every caller
gets its sequence number, in order, and the records are in the database once the callers return."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection

from keysteward.audit import group_commit
from keysteward.audit.group_commit import BATCH, GroupCommit
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


def _marks(db: Database) -> list[str]:
    with db.read() as conn:
        return [row[0] for row in conn.exec_driver_sql("SELECT n FROM marks ORDER BY rowid")]


def test_records_commit_on_the_loop_wait_for_a_brief_holder_and_go_to_the_thread_for_a_long_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "inline.db"
    db = Database(f"sqlite:///{path}")
    with db.write() as conn:
        conn.exec_driver_sql("CREATE TABLE marks (n TEXT)")
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

        # another process holds the lock for less than the loop's patience: committed on the loop after it
        holder = _hold_lock(path, group_commit.INLINE_PATIENCE / 4)
        started = time.monotonic()
        assert await group.wait_async("t", {"n": "brief"}, None) == 6
        assert time.monotonic() - started >= group_commit.INLINE_PATIENCE / 4 * 0.9
        assert committed[-1] == ("brief", loop_thread)
        holder.wait(10)

        # held for longer: the batch goes to the writer thread, which waits its turn and commits it
        holder = _hold_lock(path, group_commit.INLINE_PATIENCE * 10)
        long_wait = [group.wait_async("t", {"n": f"long{k}"}, None) for k in range(3)]
        assert await asyncio.gather(*long_wait) == [7, 8, 9]
        assert holder.poll() is not None or time.monotonic() - started >= group_commit.INLINE_PATIENCE * 10
        assert [name for _, name in committed[-3:]] == ["keysteward-audit"] * 3
        holder.wait(10)

        # the lock free again: back on the loop
        assert await group.wait_async("t", {"n": "after"}, None) == 10
        assert committed[-1] == ("after", loop_thread)

    try:
        asyncio.run(run())
    finally:
        group.close()
        db.dispose()
    assert [n for n, _ in committed] == [*(f"a{k}" for k in range(5)), "brief", "long0", "long1", "long2", "after"]


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


def test_a_loop_turn_of_more_than_a_batch_commits_renewals_first(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/first.db")
    batches: list[list[str]] = []

    def append(conn: Connection, records: list[tuple[str, dict[str, Any]]]) -> list[int]:
        batches.append([fields["n"] for _, fields in records])
        return list(range(len(records)))

    group = GroupCommit(db, append, check=lambda details: None)

    async def run() -> None:
        waiting = [group.wait_async("t", {"n": f"r{k}"}, None) for k in range(BATCH + 10)]
        waiting += [group.wait_async("t", {"n": f"renew{k}"}, None, first=True) for k in range(3)]
        await asyncio.gather(*waiting)

    try:
        asyncio.run(run())
    finally:
        group.close()
        db.dispose()
    assert len(batches) == 2 and len(batches[0]) == BATCH
    assert batches[0][:3] == ["renew0", "renew1", "renew2"]  # ahead of the loop turn's releases
    assert batches[0][3:] + batches[1] == [f"r{k}" for k in range(BATCH + 10)]  # the others in their order
