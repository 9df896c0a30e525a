"""SQLite's ``FULL`` durability, with the WAL fsync after the write lock is free.

A write transaction returns (and its after-commit hooks run) only after the WAL file holding its frames
was fsynced, and that fsync happens once the cross-process write lock is free, so another process's
writer is not held up by it; a write that asks not to wait (the audit batches) is answered after an
fsync on the syncer thread instead. A failed fsync is ``database_unavailable`` and runs no hook. ``NORMAL``
skips the fsync; ``EXTRA`` keeps SQLite's own, inside the lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from keysteward.errors import Unavailable
from keysteward.store.db import Database

pytestmark = pytest.mark.integration


class _Fsyncs:
    """os.fsync as called by the database: which file, and whether the write lock was free at the time."""

    def __init__(self, lock_path: Path, fail: bool = False) -> None:
        self.lock_path = lock_path
        self.fail = fail
        self.calls: list[tuple[str, bool]] = []
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        probe = os.open(self.lock_path, os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's writer would get it now
            fcntl.flock(probe, fcntl.LOCK_UN)
            free = True
        except BlockingIOError:
            free = False
        finally:
            os.close(probe)
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), free))
        if self.fail:
            raise OSError(5, "Input/output error")
        self._real(fd)


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "k.db"


def _ready(path: Path, synchronous: str = "FULL") -> Database:
    db = Database(f"sqlite:///{path}", sqlite_synchronous=synchronous)
    db.migrate()
    with db.write() as conn:
        conn.execute(text("CREATE TABLE probe (n INTEGER)"))
    return db


def test_a_write_returns_after_the_wal_is_synced_outside_the_lock(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _ready(path)
    try:
        with db.read() as conn:  # the connections leave the fsync to Database.write (1 = NORMAL)
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
        fsyncs = _Fsyncs(Path(f"{path}.writelock"))
        monkeypatch.setattr(os, "fsync", fsyncs)
        order: list[str] = []
        for keep in (False, True):
            with db.write(keep=keep) as conn:
                conn.execute(text("INSERT INTO probe VALUES (1)"))
                Database.after_commit(conn, lambda: order.append(f"hook after {len(fsyncs.calls)} fsync(s)"))
        assert fsyncs.calls == [(f"{path}-wal", True)] * 2  # the WAL, with the lock already free
        assert order == ["hook after 1 fsync(s)", "hook after 2 fsync(s)"]
    finally:
        db.dispose()


def test_a_failed_sync_is_unavailable_and_runs_no_hook(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _ready(path)
    try:
        monkeypatch.setattr(os, "fsync", _Fsyncs(Path(f"{path}.writelock"), fail=True))
        ran: list[bool] = []
        with pytest.raises(Unavailable) as failed:
            with db.write() as conn:
                conn.execute(text("INSERT INTO probe VALUES (1)"))
                Database.after_commit(conn, lambda: ran.append(True))
        assert failed.value.code == "database_unavailable" and ran == []
        assert "Input/output" not in str(failed.value)
    finally:
        db.dispose()


@pytest.mark.parametrize(("setting", "pragma"), [("NORMAL", 1), ("EXTRA", 3)])
def test_normal_and_extra_are_sqlites_own(
    path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, pragma: int
) -> None:
    db = _ready(path, setting)
    try:
        with db.read() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == pragma
        fsyncs = _Fsyncs(Path(f"{path}.writelock"))
        monkeypatch.setattr(os, "fsync", fsyncs)
        with db.write() as conn:
            conn.execute(text("INSERT INTO probe VALUES (1)"))
        assert fsyncs.calls == []  # (SQLite's own syncs are in C, not os.fsync)
    finally:
        db.dispose()


def test_a_committed_write_survives_a_killed_process(path: Path) -> None:
    """The commit is in the WAL when write() returns: a process killed right after loses nothing."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        db = _ready(path)
        with db.write() as conn:
            conn.execute(text("INSERT INTO probe VALUES (42)"))
        os._exit(0)  # no checkpoint, no clean close: only what write() made durable is there
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    db = Database(f"sqlite:///{path}")
    try:
        with db.read() as conn:
            assert conn.execute(text("SELECT n FROM probe")).scalars().all() == [42]
    finally:
        db.dispose()


class _HeldFsyncs:
    """os.fsync that waits until the test lets it go, and says which commits each fsync could cover."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.rows_at_start: list[int] = []
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        self.rows_at_start.append(os.fstat(fd).st_size)
        self.started.set()
        assert self.go.wait(10), "the test never let the fsync go"
        self._real(fd)


def test_a_write_that_does_not_wait_for_its_fsync_is_answered_after_it(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write(synced=...)`` returns at the commit; its answer, and its hooks before it, come after an fsync
    that began after that commit. Writes committed while an fsync runs are answered by the next one."""
    db = _ready(path)
    try:
        held = _HeldFsyncs()
        monkeypatch.setattr(os, "fsync", held)
        events: list[str] = []
        answered = threading.Event()

        def answer(name: str, last: bool = False) -> Callable[[Unavailable | None], None]:
            def synced(failed: Unavailable | None) -> None:
                events.append(f"{name} answered ({failed}) after {len(held.rows_at_start)} fsync(s)")
                if last:
                    answered.set()

            return synced

        with db.write(synced=answer("first")) as conn:
            conn.execute(text("INSERT INTO probe VALUES (1)"))
            Database.after_commit(conn, lambda: events.append("first's hook"))
        assert held.started.wait(5)  # write() returned while its fsync is still under way
        assert events == []
        for n in (2, 3):  # committed during the first fsync: the first fsync began before them
            with db.write(synced=answer(f"write {n}", last=n == 3)) as conn:
                conn.execute(text("INSERT INTO probe VALUES (:n)"), {"n": n})
        with db.read() as conn:  # committed, visible, not yet answered
            assert conn.execute(text("SELECT count(*) FROM probe")).scalar() == 3
        assert events == []
        held.go.set()
        assert answered.wait(5)
        assert events == [
            "first's hook",
            "first answered (None) after 1 fsync(s)",
            "write 2 answered (None) after 2 fsync(s)",
            "write 3 answered (None) after 2 fsync(s)",
        ]
        assert held.rows_at_start[1] > held.rows_at_start[0]  # the second fsync saw the later commits' frames
    finally:
        db.dispose()


def test_a_failed_fsync_after_a_write_that_did_not_wait_is_its_answer(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _ready(path)
    try:
        monkeypatch.setattr(os, "fsync", _Fsyncs(Path(f"{path}.writelock"), fail=True))
        ran: list[bool] = []
        got: list[Unavailable | None] = []
        answered = threading.Event()

        def synced(failed: Unavailable | None) -> None:
            got.append(failed)
            answered.set()

        with db.write(synced=synced) as conn:
            conn.execute(text("INSERT INTO probe VALUES (1)"))
            Database.after_commit(conn, lambda: ran.append(True))
        assert answered.wait(5)
        assert len(got) == 1 and isinstance(got[0], Unavailable) and got[0].code == "database_unavailable"
        assert ran == [] and "Input/output" not in str(got[0])
    finally:
        db.dispose()


def test_a_failed_transaction_is_raised_and_never_answered_later(path: Path) -> None:
    db = _ready(path)
    try:
        got: list[Unavailable | None] = []
        with pytest.raises(RuntimeError):
            with db.write(synced=got.append) as conn:
                conn.execute(text("INSERT INTO probe VALUES (1)"))
                raise RuntimeError("the transaction fails")
        with db.write(synced=got.append) as conn:  # the next write's fsync would have answered it
            conn.execute(text("INSERT INTO probe VALUES (2)"))
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert got == [None]
        with db.read() as conn:
            assert conn.execute(text("SELECT n FROM probe")).scalars().all() == [2]
    finally:
        db.dispose()
