"""The audit writer: a record marked ``first`` (a lease's renewal) goes into the next batch ahead of every
other that waits (a boot storm's releases), and the others keep their order. (An effect undone by its
savepoint while the rest of its batch commits: tests/integration/test_audit_effect_savepoints.py.)"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from keysteward.audit.group_commit import BATCH, FIRST_AT_MOST, GroupCommit
from keysteward.audit.pending import Pending
from keysteward.store.db import Database


def held_batch() -> tuple[threading.Event, threading.Event, Callable[[Connection], dict[str, Any]]]:
    """An effect that keeps the writer inside its batch: ``holding`` is set once it is, ``release`` lets it go."""
    holding, release = threading.Event(), threading.Event()

    def hold(conn: Connection) -> dict[str, Any]:
        holding.set()
        assert release.wait(10)
        return {"n": "held"}

    return holding, release, hold


def test_first_records_go_ahead_of_those_waiting(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/order.db")
    appended: list[list[Any]] = []

    def append(conn: Connection, records: list[tuple[str, dict[str, Any]]]) -> list[int]:
        appended.append([fields["n"] for _, fields in records])
        return list(range(len(records)))

    group = GroupCommit(db, append, check=lambda details: None)
    holding, release, hold = held_batch()
    try:
        blocker = group.enqueue(Pending("t", {}, effect=hold))
        assert holding.wait(10)  # the writer is inside the first batch: the rest wait in the queue
        waiting = [group.enqueue(Pending("t", {"n": k})) for k in range(BATCH + 3)]
        renewals = [group.enqueue(Pending("t", {"n": f"renew{k}"}, first=True)) for k in range(FIRST_AT_MOST + 2)]
        release.set()
        for pending in [blocker, *waiting, *renewals]:
            group.wait(pending)
    finally:
        group.close()
        db.dispose()
    names = [f"renew{k}" for k in range(FIRST_AT_MOST + 2)]
    assert appended[0] == ["held"]
    # ahead of the BATCH + 3 that waited before them, but at most half a batch: the others are not starved
    assert appended[1][:FIRST_AT_MOST] == names[:FIRST_AT_MOST]
    assert appended[1][FIRST_AT_MOST:] == list(range(BATCH - FIRST_AT_MOST))
    assert appended[2][:2] == names[FIRST_AT_MOST:]
    assert appended[1][FIRST_AT_MOST:] + appended[2][2:] == list(range(BATCH + 3))  # in their order, none lost
