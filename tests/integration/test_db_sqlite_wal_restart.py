"""SQLite's WAL starts again from its beginning under a steady load, and a slow reader does not stop writers.

A checkpoint alone never shortens the WAL: SQLite writes from its start again only when a writer begins while
every frame is copied and no reader is on the WAL. Under steady writes with overlapping readers that moment
never came, and the WAL grew by every commit (400 MB in 15 s of the KMIP bench). The checkpoint thread now
finishes each second's checkpoint under the write lock with ``RESTART``, waiting at most
``RESTART_WAIT_MS`` for readers.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from keysteward.store import db as db_module
from keysteward.store.db import Database

pytestmark = pytest.mark.integration
FRAME = 24 + 4096  # a WAL frame: its header and one page


def _ready(path: Path) -> Database:
    db = Database(f"sqlite:///{path}")
    with db.write() as conn:
        conn.execute(text("CREATE TABLE probe (n INTEGER PRIMARY KEY, body BLOB)"))
    return db


def _salt(path: Path) -> bytes:
    """The WAL header's salts: SQLite changes them each time the WAL starts again."""
    with open(f"{path}-wal", "rb") as wal:
        return wal.read(32)[16:24]


def test_the_wal_starts_again_under_steady_writes_and_readers(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    db = _ready(path)
    stop = threading.Event()
    reads = [0]

    def reader() -> None:  # overlapping read transactions, as a busy server's requests make
        while not stop.is_set():
            with db.read() as conn:
                conn.execute(text("SELECT count(*) FROM probe")).scalar()
                reads[0] += 1

    readers = [threading.Thread(target=reader) for _ in range(2)]
    try:
        for thread in readers:
            thread.start()
        first_salt, commits, deadline = None, 0, time.monotonic() + 4.5
        while time.monotonic() < deadline:
            with db.write() as conn:
                conn.execute(text("INSERT INTO probe (body) VALUES (:b)"), {"b": os.urandom(600)})
            commits += 1
            if first_salt is None:
                first_salt = _salt(path)
        stop.set()
        for thread in readers:
            thread.join()
        # each commit appended at least one frame: a WAL that never started again would hold them all
        assert commits > 200 and reads[0] > 200
        size = os.path.getsize(f"{path}-wal")
        assert size < 0.6 * commits * FRAME, f"a WAL of {size} bytes after {commits} commits"
        assert _salt(path) != first_salt, "the WAL never started again"
        with db.read() as conn:  # nothing was lost on the way
            assert conn.execute(text("SELECT count(*) FROM probe")).scalar() == commits
    finally:
        stop.set()
        db.dispose()
    reopened = Database(f"sqlite:///{path}")
    try:
        with reopened.read() as conn:
            assert conn.execute(text("SELECT count(*) FROM probe")).scalar() == commits
    finally:
        reopened.dispose()


def test_a_reader_that_stays_on_the_wal_does_not_hold_writers(tmp_path: Path) -> None:
    """The checkpoint takes the write lock to start the WAL again; a reader that keeps an old snapshot for
    seconds (a long export) makes it give up after ``RESTART_WAIT_MS``, not hold every writer that long (the
    busy timeout of 30 s); a write may still wait for the checkpoint's copy and fsync under the lock."""
    path = tmp_path / "k.db"
    db = _ready(path)
    with db.write() as conn:
        conn.execute(text("INSERT INTO probe (body) VALUES (x'00')"))
    held = threading.Event()
    release = threading.Event()

    def slow_reader() -> None:
        with db.read() as conn:
            conn.execute(text("SELECT count(*) FROM probe")).scalar()  # its snapshot holds the WAL from here
            held.set()
            release.wait(10)

    thread = threading.Thread(target=slow_reader)
    try:
        thread.start()
        assert held.wait(5)
        slowest, deadline = 0.0, time.monotonic() + 3.5  # three checkpoints or more while the reader stays
        while time.monotonic() < deadline:
            started = time.monotonic()
            with db.write() as conn:
                conn.execute(text("INSERT INTO probe (body) VALUES (x'01')"))
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.002)
        assert slowest < 1.0, f"a write waited {slowest:.3f} s behind the checkpoint"
        assert db_module.RESTART_WAIT_MS <= 100
    finally:
        release.set()
        thread.join()
        db.dispose()
