"""One batch's effects inside its write transaction: the chain heads locked first, then each effect run.

:class:`keysteward.audit.group_commit.GroupCommit` decides when and where a batch commits; these two
functions are the part of its transaction between the lock and the append. What one effect that refuses or
fails wrote is undone alone: on SQLite each effect runs under its own savepoint; on PostgreSQL, where a
savepoint is a round trip made while the batch holds its tenants' chain heads, a batch first runs without
them and, if an effect raises, :class:`Undo` has it rolled back and run again with them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from keysteward.audit.pending import Pending, Prefetching
from keysteward.audit.savepoints import Savepoints
from keysteward.errors import KeystewardError, Unavailable
from keysteward.store.driver import Fetch

EFFECT_TRIES = 3
_RETRYABLE = frozenset({"40P01", "40001"})  # PostgreSQL: deadlock detected, serialization failure
log = logging.getLogger("keysteward.audit")

Lock = Callable[[Connection, list[str], Sequence[Fetch]], list[list[Any]]]
"""Locks the given tenants' chain heads, then runs the given statements in the same round trip: their rows."""


class Undo(Exception):
    """An effect of a batch run without savepoints raised: the batch's transaction is rolled back whole."""


def lock_heads(lock: Lock | None, conn: Connection, batch: list[Pending], *, prefetch: bool) -> None:
    """PostgreSQL: lock the batch's tenants' chain heads first, in one order, before any effect runs.

    Every batch of a tenant then runs its effects while holding that tenant's head, so two servers'
    batches never hold each other's rows (volumes, leases) in opposite orders: no deadlock waits
    (each costs PostgreSQL's deadlock_timeout, a second). SQLite's BEGIN IMMEDIATE already does this:
    there the lock does nothing.

    ``prefetch`` (a batch run without savepoints): the statements of the effects at the head of the batch
    that say they are all their effect writes (:class:`~keysteward.audit.pending.Prefetching`: a release's
    one statement) leave in the lock's pipeline, and each effect then runs on its rows. Each was a round
    trip, and a wait for the GIL its event loop held, made while holding the head that the other servers'
    batches of the tenant wait for. Only a run from the head of the batch: a later statement then runs
    after the earlier effects' work as it would have, and an effect with other writes (an approval's
    bookkeeping) ends the run, since a statement sent before them would not see what they write. A
    statement that fails rolls the batch back and runs it again, each effect on its own (``Undo``).
    """
    if lock is None or not any(p.effect is not None for p in batch):
        return
    statements: list[Fetch] = []
    takers: list[Pending] = []
    for pending in batch if prefetch else ():
        if pending.effect is None:
            continue  # a plain record: nothing of it runs before the append
        ask = getattr(pending.effect, "prefetch", None)
        wanted = ask() if ask is not None else None
        if wanted is None:
            break
        statements.append(wanted)
        takers.append(pending)
    try:
        fetched = lock(conn, sorted({p.tenant_id for p in batch}), statements)
    except SQLAlchemyError:
        if not statements:
            raise
        raise Undo from None
    for pending, rows in zip(takers, fetched, strict=True):
        pending.fetched = rows


def run_effects(
    conn: Connection,
    batch: list[Pending],
    again: list[Pending],
    *,
    guarded: bool,
    sqlite: bool,
    check: Callable[[Mapping[str, Any]], None],
) -> list[Pending]:
    """Run each effect; those that refuse are undone and left unrecorded.

    ``guarded``: each effect that writes runs under its own savepoint, which undoes it alone when it raises
    (the rest of the batch goes on). An effect that loses a deadlock or a serialization race on
    PostgreSQL (two servers' batches locking rows in different orders) is undone and put in ``again``: it
    runs first in the next transaction, after this one has let its locks go (at most
    :data:`EFFECT_TRIES` times in all).

    Not ``guarded`` (PostgreSQL, where each savepoint is a round trip made while the batch holds its
    tenants' chain heads): no savepoints; the first effect that raises after it may have written, or
    whose statement failed, raises :class:`Undo` instead, and the batch's whole transaction is rolled
    back and run again guarded (and the next batches too, for :data:`GUARDED_SECONDS`). Effects already
    run again after a deadlock, so running them twice is safe; nothing of the first run is kept.
    """
    recorded = []
    savepoints = Savepoints(conn, merge=not sqlite) if guarded else None
    for pending in batch:
        pending.error = None
        if pending.effect is not None:
            try:
                if pending.writes and savepoints is not None:
                    with savepoints.effect():
                        pending.fields = pending.effect(conn)
                        check(pending.fields.get("details") or {})
                else:  # nothing to undo, or undone with the whole transaction: no savepoint's statements
                    fetched, pending.fetched = pending.fetched, None
                    if fetched is None:
                        pending.fields = pending.effect(conn)
                    else:
                        pending.fields = cast(Prefetching, pending.effect).fetched(conn, fetched)
                    check(pending.fields.get("details") or {})
            except KeystewardError as exc:
                if pending.writes and savepoints is None:
                    raise Undo from None
                pending.error = exc
                continue
            except SQLAlchemyError as exc:  # undone by its savepoint; the rest of the batch goes on
                if savepoints is None:
                    raise Undo from None
                state = getattr(getattr(exc, "orig", None), "sqlstate", None)
                pending.tries += 1
                if state in _RETRYABLE and pending.tries < EFFECT_TRIES:
                    again.append(pending)
                    continue
                log.warning("a change failed in the database (%s, state %s)", type(exc).__name__, state)
                pending.error = Unavailable("the database refused the change", code="database_unavailable")
                pending.error.__cause__ = exc
                continue
            if not pending.fields:
                continue
        recorded.append(pending)
    return recorded
