"""SQLite's ``FULL`` durability, with the WAL fsync after the write lock is free.

A write transaction returns (and its after-commit hooks run) only after the WAL file holding its frames
was fsynced, and that fsync happens once the cross-process write lock is free, so another process's
writer is not held up by it. A failed fsync is ``database_unavailable`` and runs no hook. ``NORMAL``
skips the fsync; ``EXTRA`` keeps SQLite's own, inside the lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
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
