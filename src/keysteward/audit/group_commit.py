"""Group commit: concurrent callers' audit records, and the changes that go with them, in one transaction.

Callers hand a record (or an effect: a change that returns its record) to one writer thread, which runs a
whole batch in one write transaction (one fsync), runs the effects, appends the records, commits, and
then releases every caller. What one effect that refuses or fails wrote is undone alone
(:mod:`keysteward.audit.batch_effects`). No caller returns before its record is durable, and a
failed batch fails all of its callers. The chain itself (hashes, signatures, heads) is
:class:`keysteward.audit.log.AuditLog`'s, handed in as ``append``.

Records that coroutines wait for are committed on their own event loop instead: what two loop turns produced
is one batch, run right after the second. On the writer thread each statement (SQLite) or round trip
(PostgreSQL) also waited for the GIL its busy loop held, and that wait was most of a request's commit. The
second turn lets the requests whose data arrived with the first one's join its batch, which shares one
transaction, its pages and one fsync among its records.

- SQLite: the write lock is taken without waiting; while another writer holds it the loop serves on and
  tries again every :data:`INLINE_RETRY`, for as long as the callers wait. Such a batch never goes to the
  thread, however long the lock stays taken: a thread starved of the GIL by its own loop held the lock far
  longer than the loop would have, and that fed on itself across the workers.
- PostgreSQL: a batch is two pipelined round trips, and stops its loop for them. So the loop's batches go
  to the thread as soon as one of them fails or takes longer than :data:`INLINE_SLOW` (a failing over or
  hung primary, a lagging synchronous standby), and come back once a batch there commits within that: a
  database that turns slow stops a loop for one batch, bounded by the connection deadline of
  :mod:`keysteward.store.pg_ha`, not for every batch.

The measurements behind both are in docs/operations.md, "Audit log" and the sessions after it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from keysteward.audit.batch_effects import Lock, Undo, lock_heads, run_effects
from keysteward.audit.pending import Effect, Pending
from keysteward.errors import KeystewardError, Unavailable
from keysteward.store.db import Database, WriteLockBusy

_UNAVAILABLE = "the audit record could not be written, so the request was not carried out"
BATCH = 512
FIRST_AT_MOST = BATCH // 2
log = logging.getLogger("keysteward.audit")
WAIT_SECONDS = 30.0
GUARDED_SECONDS = 1.0
"""After a batch run without savepoints had to be rolled back and run again, how long the next batches run
with them (an effect that keeps failing costs one batch run twice a second at most)."""
INLINE_RETRY = 0.0005
"""Seconds between a loop's tries for a busy write lock."""
INLINE_SLOW = 0.05
"""PostgreSQL: seconds a batch may take on its loop; one slower (or failed) sends the next batches to the writer
thread until one commits there within this again. Well above a healthy batch (docs/operations.md, eighth
session)."""
SLOW_LOG = 1.0
"""PostgreSQL: a batch on its loop that took this long (or failed) is logged (a shorter one only moves batches)."""


def _failure_code(exc: Exception) -> str:
    """``database_unavailable`` when the database itself failed (down, failing over, a commit its synchronous
    standby never confirmed): the client may try another server; else ``audit_unavailable``."""
    database = isinstance(exc, Unavailable) and exc.code == "database_unavailable"
    return "database_unavailable" if database else "audit_unavailable"


def _log_failure(batch: list[Pending], exc: BaseException) -> None:
    """Say that a batch failed, and why, by the error's type and SQLSTATE only (a database's message may quote
    the values of the statement)."""
    cause = exc.__cause__ if isinstance(exc, KeystewardError) and exc.__cause__ is not None else exc
    driver = getattr(cause, "orig", cause)
    state = getattr(driver, "sqlstate", None)
    log.warning("an audit batch of %d records failed: %s (state %s)", len(batch), type(driver).__name__, state)


Append = Callable[[Connection, list[tuple[str, dict[str, Any]]]], list[int]]


class GroupCommit:
    """The writer thread and its queue (see the module doc)."""

    def __init__(
        self,
        db: Database,
        append: Append,
        *,
        check: Callable[[Mapping[str, Any]], None],
        lock: Lock | None = None,
        prepare: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.db = db
        self._append = append
        self._check = check
        self._lock = lock
        """Locks the given tenants' chain heads in the batch's transaction (the chain's, handed in like ``append``),
        and runs the effects' prefetched statements with the lock."""
        self._prepare = prepare
        """Does a record's own work (its encoding) before the batch takes the write lock, so the lock is held
        for less time; records that effects return are made inside the transaction and skip it."""
        self._queue: list[Pending] = []
        self._first: list[Pending] = []
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closed = False
        self._guarded_until = 0.0
        self._inline: dict[asyncio.AbstractEventLoop, list[Pending]] = {}
        """Each loop's records waiting for its next inline batch (touched only on that loop's thread)."""
        self.pg_on_loop = not db.is_sqlite
        """PostgreSQL: whether loops commit their batches themselves now (see the module doc)."""

    def wait(self, pending: Pending) -> int:
        assert pending.done is not None, "a pending record with a notify callback is waited for by wait_async"
        if not pending.done.wait(WAIT_SECONDS):
            pending.abandoned = True
            raise Unavailable(_UNAVAILABLE, code="audit_unavailable")
        return pending.result()

    async def wait_async(
        self, tenant_id: str, fields: dict[str, Any], effect: Effect | None, *, writes: bool = True, first: bool = False
    ) -> int:
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[bool] = loop.create_future()

        def settle(in_time: bool) -> None:
            if not committed.done():
                committed.set_result(in_time)

        if self.db.can_try_write or self.pg_on_loop:
            pending = Pending(tenant_id, fields, functools.partial(settle, True), effect, writes=writes, first=first)
            self._add_inline(loop, pending)
        else:
            notify = functools.partial(loop.call_soon_threadsafe, settle, True)
            pending = self.enqueue(Pending(tenant_id, fields, notify, effect, writes=writes, first=first))
        timer = loop.call_later(WAIT_SECONDS, settle, False)  # a timer handle, not asyncio.wait_for's extra task
        try:
            in_time = await committed
        finally:
            timer.cancel()
            # left without its answer: timed out (False), or cancelled (which cancels ``committed`` too)
            pending.abandoned = not committed.done() or committed.cancelled() or not committed.result()
        if not in_time:
            raise Unavailable(_UNAVAILABLE, code="audit_unavailable")
        return pending.result()

    def _add_inline(self, loop: asyncio.AbstractEventLoop, pending: Pending) -> None:
        if self._closed:
            raise Unavailable(_UNAVAILABLE, code="audit_unavailable")
        waiting = self._inline.get(loop)
        if waiting is None:
            self._inline[loop] = [pending]
            loop.call_soon(loop.call_soon, self._flush_inline, loop)  # after the next turn (see the module doc)
        else:
            waiting.append(pending)

    def _flush_inline(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit what this loop's callers handed over since the last batch, on this loop (see the module doc)."""
        waiting = [pending for pending in self._inline.pop(loop, ()) if not pending.abandoned]
        if not waiting:
            return
        if len(waiting) > BATCH:  # renewals of live leases (``first``) in the first batch, the others in their order
            waiting.sort(key=lambda pending: not pending.first)
        batch, rest = waiting[:BATCH], waiting[BATCH:]
        started = time.monotonic()
        try:
            again, error = self._commit(batch, wait=False)
        except WriteLockBusy:
            if self._closed:
                self._to_thread(loop, waiting)  # which refuses them: the log is closing
                return
            # try again on this loop; what its callers add meanwhile joins this batch (they time out after
            # WAIT_SECONDS, as on the thread)
            self._inline[loop] = waiting
            loop.call_later(INLINE_RETRY, self._flush_inline, loop)
            return
        took = time.monotonic() - started
        if self.pg_on_loop and (error is not None or took > INLINE_SLOW):
            self.pg_on_loop = False
            if took > SLOW_LOG or error is not None:
                log.info("audit batches go to the writer thread: one took %.0f ms on its event loop%s",
                         1000 * took, " and failed" if error is not None else "")  # fmt: skip
        if again:
            self._to_thread(loop, again)
        self._settle(batch, again, error)
        if rest:  # nothing else was added meanwhile: waking callers only schedules their futures' callbacks
            self._inline[loop] = rest
            loop.call_soon(self._flush_inline, loop)

    def _to_thread(self, loop: asyncio.AbstractEventLoop, waiting: list[Pending]) -> None:
        """Hand records waiting on ``loop`` to the writer thread, which wakes them through the loop."""
        for pending in waiting:
            if pending.notify is not None:
                pending.notify = functools.partial(loop.call_soon_threadsafe, pending.notify)
            try:
                self.enqueue(pending)
            except Unavailable as exc:
                pending.error = exc
                self._notify(pending)

    def enqueue(self, pending: Pending) -> Pending:
        with self._wake:
            if self._closed:
                raise Unavailable(_UNAVAILABLE, code="audit_unavailable")
            (self._first if pending.first else self._queue).append(pending)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_batches, name="keysteward-audit", daemon=True)
                self._writer.start()
            self._wake.notify()
        return pending

    def _write_batches(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._first and not self._closed:
                    self._wake.wait()
                if not self._queue and not self._first:
                    return
                # renewals first, but at most half a batch of them: a flood of renewals never starves releases
                batch, self._first = self._first[:FIRST_AT_MOST], self._first[FIRST_AT_MOST:]
                rest = BATCH - len(batch)
                batch, self._queue = batch + self._queue[:rest], self._queue[rest:]
                batch = [pending for pending in batch if not pending.abandoned]
                if not batch:
                    continue
            started = time.monotonic()
            again, error = self._commit(batch)
            if (
                not self.db.is_sqlite
                and not self.pg_on_loop
                and error is None
                and time.monotonic() - started <= INLINE_SLOW
            ):
                self.pg_on_loop = True  # the database answers fast again: loops commit their batches themselves
            if again:
                with self._wake:
                    self._queue[:0] = again  # first in the next transaction, once this one's locks are gone
            self._settle(batch, again, error)

    def _commit(self, batch: list[Pending], *, wait: bool = True) -> tuple[list[Pending], KeystewardError | None]:
        """Run one batch's transaction: the effects to run again in the next (none when the batch failed) and
        the error every caller of a failed batch gets. ``wait`` False: :class:`WriteLockBusy` when another
        writer holds the lock, before anything was done."""
        again: list[Pending] = []
        try:
            self._prepare_records(batch)
            guarded = self.db.is_sqlite or time.monotonic() < self._guarded_until
            try:
                recorded, seqs = self._transaction(batch, again, wait=wait, guarded=guarded)
            except Undo:  # rolled back whole: run it again, each effect under its savepoint
                self._guarded_until = time.monotonic() + GUARDED_SECONDS
                again.clear()
                recorded, seqs = self._transaction(batch, again, wait=wait, guarded=True)
            for pending, seq in zip(recorded, seqs, strict=True):
                pending.seq = seq
        except WriteLockBusy:
            raise
        except (SQLAlchemyError, KeystewardError) as exc:
            _log_failure(batch, exc)
            error = Unavailable(_UNAVAILABLE, code=_failure_code(exc))
            error.__cause__ = exc
            return [], error
        except Exception as exc:  # noqa: BLE001 - whatever it was, every waiter must hear of it
            _log_failure(batch, exc)
            error = Unavailable(_UNAVAILABLE, code="audit_unavailable")
            error.__cause__ = exc
            return [], error
        return again, None

    def _transaction(
        self, batch: list[Pending], again: list[Pending], *, wait: bool, guarded: bool
    ) -> tuple[list[Pending], list[int]]:
        with self.db.write(keep=True, wait=wait) as conn:
            for pending in batch:
                pending.fetched = None  # what an earlier run of this batch prefetched was rolled back
            lock_heads(self._lock, conn, batch, prefetch=not guarded)
            recorded = run_effects(conn, batch, again, guarded=guarded, sqlite=self.db.is_sqlite, check=self._check)
            return recorded, self._append(conn, [(p.tenant_id, p.fields) for p in recorded])

    def _settle(self, batch: list[Pending], again: list[Pending], error: KeystewardError | None) -> None:
        """Wake the batch's callers, except those whose effect runs again."""
        for pending in batch:
            if pending in again:
                continue
            if error is not None:
                pending.error = error
            self._notify(pending)

    @staticmethod
    def _notify(pending: Pending) -> None:
        if pending.done is not None:
            pending.done.set()
        if pending.notify is not None:
            try:
                pending.notify()
            except RuntimeError:  # its event loop has closed: nobody is waiting any more
                pass

    def _prepare_records(self, batch: list[Pending]) -> None:
        if self._prepare is None:
            return
        for pending in batch:
            if pending.effect is None and pending.fields:
                self._prepare(pending.fields)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=10)
