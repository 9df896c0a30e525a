"""The audit log service: appends links to a tenant's chain, fail-closed, and reads them back.

A caller that changes state appends its record inside its own write transaction, so the
change and its record commit together or not at all. A caller that only reads (decrypt)
writes its record with :meth:`AuditLog.record` before it answers. Either way, if the record
cannot be written the request fails with ``audit_unavailable``.

``record`` commits in groups: concurrent callers hand their records to one writer thread,
which appends a whole batch in one transaction (one fsync) and then releases every caller.
No caller returns before its record is durable, and a failed batch fails all of its callers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from keysteward.audit import chain, checkpoint
from keysteward.errors import KeystewardError, Unavailable
from keysteward.store.db import Database, for_update
from keysteward.store.models import AuditHead, AuditRecord, Cluster

_SCALARS = (str, int, float, bool, type(None))


def _check_details(details: Mapping[str, Any]) -> None:
    """Audit details are plain metadata: refuse bytes and anything else that could carry a secret."""
    for key, value in details.items():
        if isinstance(value, Mapping):  # one level of named scalars: labels, verified claims
            if not all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in value.items()):
                _refuse(key)
            continue
        items = value if isinstance(value, list | tuple) else [value]
        if not isinstance(key, str) or not all(isinstance(v, _SCALARS) for v in items):
            _refuse(key)


def _is_destroy(action: str) -> bool:
    """Key, key version, volume (and any later kind's) destruction: each one publishes a checkpoint."""
    return action.endswith(".destroy")


def _refuse(key: object) -> None:
    raise TypeError(f"audit detail {key!r} must be a string, number, boolean, a list of them or a map of them")


_UNAVAILABLE = "the audit record could not be written, so the request was not carried out"
BATCH = 512
EFFECT_TRIES = 3
_RETRYABLE = frozenset({"40P01", "40001"})  # PostgreSQL: deadlock detected, serialization failure
log = logging.getLogger("keysteward.audit")
WAIT_SECONDS = 30.0


Effect = Callable[[Connection], dict[str, Any]]
"""A change committed together with its audit record: it runs in the batch's transaction (under a
savepoint) and returns the record's fields (or ``{}``: a routine change that needs no record). Raising a
KeystewardError undoes the change and records nothing."""


class _Pending:
    """One record waiting for its batch: a thread waits on ``done``; a coroutine gets ``notify`` called."""

    __slots__ = ("done", "effect", "error", "fields", "notify", "seq", "tenant_id", "tries")

    def __init__(
        self,
        tenant_id: str,
        fields: dict[str, Any],
        notify: Callable[[], object] | None = None,
        effect: Effect | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.fields = fields
        self.done = threading.Event()
        self.notify = notify
        self.effect = effect
        self.seq = 0
        self.tries = 0
        self.error: KeystewardError | None = None

    def result(self) -> int:
        if self.error is not None:
            raise self.error
        return self.seq


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._signer: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.on_destroy: list[Callable[[str, int], None]] = []
        """Called with (tenant, seq) when a destroy record is appended (before its transaction commits)."""

    def set_signer(self, key: Ed25519PrivateKey | None) -> None:
        with self._lock:
            self._signer = key

    def public_key(self) -> Ed25519PublicKey:
        with self.db.read() as conn:
            raw = conn.execute(select(Cluster.audit_public_key)).scalar_one()
        return Ed25519PublicKey.from_public_bytes(raw)

    def ensure_head(self, conn: Connection, tenant_id: str) -> None:
        conn.execute(insert(AuditHead).values(tenant_id=tenant_id, seq=0, hash=chain.GENESIS))

    def append(
        self,
        conn: Connection,
        tenant_id: str,
        *,
        actor: str,
        action: str,
        target: str = "",
        outcome: str = "ok",
        reason: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one record inside the caller's write transaction; returns its sequence number."""
        fields = {
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "reason": reason,
            "details": details or {},
        }
        return self.append_many(conn, [(tenant_id, fields)])[0]

    def append_many(self, conn: Connection, entries: list[tuple[str, dict[str, Any]]]) -> list[int]:
        """Append records in order; each tenant's head row is locked and moved once for the lot."""
        for _, fields in entries:
            _check_details(fields.get("details") or {})
        seqs = [0] * len(entries)
        by_tenant: dict[str, list[int]] = {}
        for i, (tenant_id, _) in enumerate(entries):
            by_tenant.setdefault(tenant_id, []).append(i)
        signer = self._signer
        try:
            for tenant_id, indexes in by_tenant.items():
                head = conn.execute(
                    for_update(select(AuditHead.seq, AuditHead.hash).where(AuditHead.tenant_id == tenant_id), self.db)
                ).one_or_none()
                if head is None:
                    self.ensure_head(conn, tenant_id)
                    seq, prev = 0, chain.GENESIS
                else:
                    seq, prev = head.seq, head.hash
                rows = []
                for i in indexes:
                    fields = entries[i][1]
                    seq += 1
                    body = chain.make_body(
                        seq=seq,
                        prev=prev,
                        ts=datetime.now(UTC).isoformat(timespec="microseconds"),
                        actor=fields["actor"],
                        action=fields["action"],
                        target=fields.get("target", ""),
                        outcome=fields.get("outcome", "ok"),
                        reason=fields.get("reason", ""),
                        details=fields.get("details") or {},
                    )
                    prev = chain.link_hash(body)
                    signature = chain.sign(signer, tenant_id, seq, prev) if signer is not None else None
                    rows.append(
                        {"tenant_id": tenant_id, "seq": seq, "body": body, "hash": prev, "signature": signature}
                    )
                    seqs[i] = seq
                conn.execute(insert(AuditRecord), rows)
                destroyed = [seqs[i] for i in indexes if _is_destroy(entries[i][1].get("action", ""))]
                conn.execute(update(AuditHead).where(AuditHead.tenant_id == tenant_id).values(seq=seq, hash=prev))
                if destroyed:
                    for callback in self.on_destroy:
                        callback(tenant_id, max(destroyed))
        except (SQLAlchemyError, KeystewardError) as exc:
            raise Unavailable(_UNAVAILABLE, code="audit_unavailable") from exc
        return seqs

    def heads(self) -> list[tuple[str, int, str]]:
        """Every chain's committed head: (tenant, seq, hash), chains with no record left out."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(AuditHead.tenant_id, AuditHead.seq, AuditHead.hash)
                .where(AuditHead.seq > 0)
                .order_by(AuditHead.tenant_id)
            ).all()
        return [(r.tenant_id, r.seq, r.hash) for r in rows]

    def sign_checkpoint(self, tenant_id: str, seq: int, hash_hex: str) -> checkpoint.Checkpoint | None:
        """A checkpoint of this head signed by the audit key, or None while sealed (no key to sign with)."""
        signer = self._signer
        if signer is None:
            return None
        return checkpoint.sign(signer, tenant_id, seq, hash_hex, datetime.now(UTC).isoformat(timespec="microseconds"))

    def record(self, tenant_id: str, **fields: Any) -> int:
        """Append one record and wait until it is committed (group commit with concurrent callers)."""
        return self._wait(self._enqueue(_Pending(tenant_id, fields)))

    async def record_async(self, tenant_id: str, **fields: Any) -> int:
        """:meth:`record` for the event loop: waits for the commit without holding a thread."""
        return await self._wait_async(tenant_id, fields, None)

    def commit(self, tenant_id: str, effect: Effect) -> int:
        """Run ``effect`` and append the record it returns in one group-committed transaction."""
        return self._wait(self._enqueue(_Pending(tenant_id, {}, effect=effect)))

    async def commit_async(self, tenant_id: str, effect: Effect) -> int:
        """:meth:`commit` for the event loop."""
        return await self._wait_async(tenant_id, {}, effect)

    def _wait(self, pending: _Pending) -> int:
        if not pending.done.wait(WAIT_SECONDS):
            raise Unavailable(_UNAVAILABLE, code="audit_unavailable")
        return pending.result()

    async def _wait_async(self, tenant_id: str, fields: dict[str, Any], effect: Effect | None) -> int:
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not committed.done():
                committed.set_result(None)

        pending = self._enqueue(_Pending(tenant_id, fields, lambda: loop.call_soon_threadsafe(wake), effect))
        try:
            await asyncio.wait_for(committed, WAIT_SECONDS)
        except TimeoutError as exc:
            raise Unavailable(_UNAVAILABLE, code="audit_unavailable") from exc
        return pending.result()

    def _enqueue(self, pending: _Pending) -> _Pending:
        if pending.effect is None:
            _check_details(pending.fields.get("details") or {})
        with self._wake:
            if self._closed:
                raise Unavailable(_UNAVAILABLE, code="audit_unavailable")
            self._queue.append(pending)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_batches, name="keysteward-audit", daemon=True)
                self._writer.start()
            self._wake.notify()
        return pending

    def _write_batches(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            error: KeystewardError | None = None
            again: list[_Pending] = []
            try:
                with self.db.write() as conn:
                    self._lock_heads(conn, batch)
                    recorded = self._run_effects(conn, batch, again)
                    seqs = self.append_many(conn, [(p.tenant_id, p.fields) for p in recorded])
                for pending, seq in zip(recorded, seqs, strict=True):
                    pending.seq = seq
            except (SQLAlchemyError, KeystewardError) as exc:
                error = Unavailable(_UNAVAILABLE, code="audit_unavailable")
                error.__cause__ = exc
            except Exception as exc:  # noqa: BLE001 - whatever it was, every waiter must hear of it
                error = Unavailable(_UNAVAILABLE, code="audit_unavailable")
                error.__cause__ = exc
            if again and error is None:
                with self._wake:
                    self._queue[:0] = again  # first in the next transaction, once this one's locks are gone
            for pending in batch:
                if pending in again and error is None:
                    continue
                if error is not None:
                    pending.error = error
                pending.done.set()
                if pending.notify is not None:
                    try:
                        pending.notify()
                    except RuntimeError:  # its event loop has closed: nobody is waiting any more
                        pass

    def _lock_heads(self, conn: Connection, batch: list[_Pending]) -> None:
        """PostgreSQL: lock the batch's tenants' chain heads first, in one order, before any effect runs.

        Every batch of a tenant then runs its effects while holding that tenant's head, so two servers'
        batches never hold each other's rows (volumes, leases) in opposite orders: no deadlock waits
        (each costs PostgreSQL's deadlock_timeout, a second). SQLite's BEGIN IMMEDIATE already does this.
        """
        if self.db.is_sqlite or not any(p.effect is not None for p in batch):
            return
        tenants = sorted({p.tenant_id for p in batch})
        conn.execute(
            for_update(select(AuditHead.tenant_id).where(AuditHead.tenant_id.in_(tenants)), self.db).order_by(
                AuditHead.tenant_id
            )
        ).all()

    @staticmethod
    def _run_effects(conn: Connection, batch: list[_Pending], again: list[_Pending]) -> list[_Pending]:
        """Run each effect under its own savepoint; those that refuse are undone and left unrecorded.

        An effect that loses a deadlock or a serialization race on PostgreSQL (two servers' batches
        locking rows in different orders) is undone and put in ``again``: it runs first in the next
        transaction, after this one has let its locks go (at most :data:`EFFECT_TRIES` times in all).
        """
        recorded = []
        for pending in batch:
            pending.error = None
            if pending.effect is not None:
                try:
                    with conn.begin_nested():
                        pending.fields = pending.effect(conn)
                        _check_details(pending.fields.get("details") or {})
                except KeystewardError as exc:
                    pending.error = exc
                    continue
                except SQLAlchemyError as exc:  # undone by its savepoint; the rest of the batch goes on
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

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=10)

    def links(self, tenant_id: str, *, after: int = 0, limit: int = 1000) -> list[chain.Link]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(AuditRecord)
                .where(AuditRecord.tenant_id == tenant_id, AuditRecord.seq > after)
                .order_by(AuditRecord.seq)
                .limit(limit)
            ).all()
        return [chain.Link(r.tenant_id, r.seq, r.body, r.hash, r.signature) for r in rows]
