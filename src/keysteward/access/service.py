"""AccessService: the one decision every key use goes through (DESIGN.md section 2).

    decide(request)
      1. the principal proven by the front-end (or by the evidence), the nonce checked  } handler.resolve
      2. evidence verified into typed facts, the resource loaded                         }
      3. the tenant's Cedar policy evaluated on those facts (here, for every action)
         an operation on the caller's behalf runs now, only on permit, its result held  (handler.perform)
      4. in one transaction with the audit record: revocations and state (handler.check), the policy's
         denial, then the action's bookkeeping (handler.book: lease, approval, state change)
      5. after the commit, only on permit: unwrap and deliver (handler.deliver)

A denial never reaches step 5, so it never unwraps a key; a request that fails before a principal is
proven is audited as a refusal. Front-ends build an :class:`~keysteward.access.request.AccessRequest`
and turn the result (or the :class:`~keysteward.errors.Denied` raised) back into their protocol.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from sqlalchemy import Connection

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Refusal, Subject, Unproven
from keysteward.access.refusals import RefusalGate
from keysteward.access.request import AccessRequest, Delivery
from keysteward.audit.log import AuditLog
from keysteward.errors import KeystewardError, NotFound
from keysteward.identity.tenants import NO_TENANT_ID, Tenants
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.store import PolicyStore, PolicyVersion
from keysteward.store.driver import Fetch

log = logging.getLogger("keysteward.access")
NO_QUESTION = PolicyDecision("permit", (), None, (), "permitted")
"""The decision of an action that asks the policy nothing (a holder giving its lease back)."""


@dataclass
class _Verdict:
    denied: KeystewardError | None = None
    booked: Booked | None = None


@dataclass
class _Step:
    """A prepared decision: the effect committed with its audit record, and how to answer after it."""

    tenant_id: str
    effect: Callable[[Connection], dict[str, Any]]
    verdict: _Verdict
    handler: ActionHandler | None = None
    subject: Subject | None = None
    performed: Any = None
    failed: KeystewardError | None = None
    counted: tuple[str, str, Unproven] | None = None
    """(action, source, what) of an unproven caller's refusal, counted after its effect committed."""

    @property
    def writes(self) -> bool:
        return self.handler is None or self.handler.writes

    @property
    def first(self) -> bool:
        return self.handler is not None and self.handler.first


class AccessService:
    def __init__(
        self,
        tenants: Tenants,
        policies: PolicyStore,
        audit: AuditLog,
        actions: ActionTable,
        alert: Callable[[dict[str, Any]], None] | None = None,
        refusals: RefusalGate | None = None,
    ) -> None:
        self.tenants = tenants
        self.policies = policies
        self.audit = audit
        self.actions = actions
        self._reads_local = audit.db.is_sqlite
        self._alert = alert
        self.refusals = refusals

    # -- the one path ---------------------------------------------------------------------------------
    def decide(self, request: AccessRequest) -> Any:
        """Decide ``request``: the delivered value, a :class:`~keysteward.policy.approvals.Waiting`, or
        :class:`~keysteward.errors.Denied` (and other KeystewardErrors) raised, each audited first."""
        step = self._prepare(request)
        self._commit(step)
        return self._finish(step)

    async def decide_async(self, request: AccessRequest, *, cold_in_thread: bool = False) -> Any:
        """:meth:`decide` on the event loop: what is cached runs here, a database read goes to a thread
        (with ``cold_in_thread``, the whole request when it is not warm: its delivery may read too).

        On SQLite a read is local and short, and readers never wait for the writer (WAL), so a cold request runs
        here too, unless its action ``reads_many``: the hop to a thread, and that thread's commit through the
        audit writer thread, cost more than the reads. Measured with KMIP's new-connection load, where an
        object made on one worker is cold on the other: 431-465 operations/s against 328-379, 3.6-3.8 ms of
        server CPU per operation against 4.2-4.9."""
        handler = self.actions.get(request.action)
        tenant_id = self.tenants.cached_id(request.tenant)
        if (self._reads_local and not handler.reads_many) or (
            tenant_id is not None and self.policies.cached(tenant_id) is not None and handler.warm(request, tenant_id)
        ):
            step = self._prepare(request)
        elif cold_in_thread:
            return await anyio.to_thread.run_sync(self.decide, request)
        else:
            step = await anyio.to_thread.run_sync(self._prepare, request)
        if step.effect is _no_effect:
            return self._finish(step)
        try:
            await self.audit.commit_async(step.tenant_id, step.effect, writes=step.writes, first=step.first)
        except BaseException:
            self._discard(step)
            raise
        return self._finish(step)

    def _commit(self, step: _Step) -> None:
        if step.effect is _no_effect:
            return
        try:
            self.audit.commit(step.tenant_id, step.effect, writes=step.writes, first=step.first)
        except BaseException:
            self._discard(step)
            raise

    def _discard(self, step: _Step) -> None:
        if step.handler is not None and step.subject is not None and step.performed is not None:
            step.handler.discard(step.subject, step.performed)

    def _prepare(self, request: AccessRequest) -> _Step:
        handler = self.actions.get(request.action)
        if request.delivery != handler.delivery:
            raise ValueError(f"{request.action} delivers {handler.delivery}, not {request.delivery}")
        now = datetime.now(UTC)
        unproven = handler.unproven(request) if request.principal is None else None
        if unproven is not None:
            if self.refusals is not None:
                cached = self.tenants.cached_id(request.tenant)
                self.refusals.admit(request.context.source, cached, handler.action, unproven.target, unproven.sample)
            tenant_id = self.tenants.id_or_unknown(request.tenant)
        else:
            try:
                tenant_id = self.tenants.id_of(request.tenant)
            except NotFound:
                log.info("%s for an unknown tenant refused", request.action)
                raise handler.unknown_tenant() from None
            if request.principal is not None and request.principal.tenant_id != tenant_id:
                raise handler.unknown_tenant()  # a principal of one tenant never reaches another's resources
        try:
            subject = handler.resolve(request, tenant_id, now)
        except Refusal as refused:
            step = _Step(refused.tenant_id, refused.effect or _no_effect, _Verdict(denied=refused.denied))
            if refused.unproven is not None:
                step.counted = (handler.action, request.context.source, refused.unproven)
            return step
        if tenant_id == NO_TENANT_ID:  # resolve found something of no tenant: never go on with it
            raise handler.unknown_tenant()
        policy, decision = self._evaluate(tenant_id, subject)
        step = _Step(tenant_id, _no_effect, _Verdict(), handler, subject)
        if decision.effect != "deny" and handler.delivery is Delivery.OPERATION:
            try:
                step.performed = handler.perform(subject)
            except KeystewardError as exc:
                step.failed = exc
        step.effect = _Effect(handler, subject, step.verdict, step.failed, policy, decision, now)
        return step

    def _evaluate(self, tenant_id: str, subject: Subject) -> tuple[PolicyVersion | None, PolicyDecision]:
        if subject.facts is None:
            return None, NO_QUESTION
        policy = self.policies.current(tenant_id)
        decision = policy.compiled.evaluate(subject.facts)
        for more in subject.more_facts:
            if decision.effect == "deny":
                break
            other = policy.compiled.evaluate(more)
            if other.effect == "deny" or (other.effect == "approval" and decision.effect == "permit"):
                decision = other
        return policy, decision

    def _finish(self, step: _Step) -> Any:
        verdict = step.verdict
        if step.counted is not None and verdict.denied is not None and self.refusals is not None:
            action, source, what = step.counted
            self.refusals.refused(
                step.tenant_id, action, verdict.denied.code, source=source, target=what.target, sample=what.sample
            )
        if step.subject is not None and self._alert is not None:
            for alert in step.subject.alerts:
                self._alert(alert)
        if verdict.denied is not None:
            self._discard(step)
        error = verdict.denied or step.failed
        if error is not None:
            # raised with nothing of this request holding it: the error's traceback holds the frames that made
            # it (and so the step); a step still holding the error would make a reference cycle
            verdict.denied = step.failed = None
            step.effect = _no_effect  # committed: and it holds the error too
            try:
                raise error
            finally:
                del error
        booked = verdict.booked
        assert booked is not None and step.handler is not None and step.subject is not None
        if booked.pending is not None:
            return booked.pending
        return step.handler.deliver(step.subject, booked, step.performed)


class _Effect:
    """Step 4 as the audit log's effect: it runs in the batch transaction and returns the record.

    The effect holds what it needs, never the step that holds it: a step and its effect referring to each
    other were a reference cycle per request, which only the cyclic garbage collector freed, in pauses
    of 5-10 ms on the event loop every second or so under load (and a full collection of about 100 ms).

    It is :class:`~keysteward.audit.pending.Prefetching`: when the handler says its checks and bookkeeping
    write with one statement (:meth:`ActionHandler.prefetch`), the batch may send that statement ahead and
    run the effect on its rows."""

    __slots__ = ("decision", "failed", "handler", "now", "policy", "subject", "verdict")

    def __init__(
        self,
        handler: ActionHandler,
        subject: Subject,
        verdict: _Verdict,
        failed: KeystewardError | None,
        policy: PolicyVersion | None,
        decision: PolicyDecision,
        now: datetime,
    ) -> None:
        self.handler, self.subject, self.verdict, self.failed = handler, subject, verdict, failed
        self.policy, self.decision, self.now = policy, decision, now

    def __call__(self, conn: Connection) -> dict[str, Any]:
        return self._run(conn, None)

    def prefetch(self) -> Fetch | None:
        return None if self.failed is not None else self.handler.prefetch(self.subject, self.decision)

    def fetched(self, conn: Connection, rows: list[Any]) -> dict[str, Any]:
        return self._run(conn, rows)

    def _run(self, conn: Connection, rows: list[Any] | None) -> dict[str, Any]:
        handler, subject, verdict = self.handler, self.subject, self.verdict
        decision, policy = self.decision, self.policy
        subject.alerts.clear()  # an effect may run again after a deadlock
        subject.fetched = rows
        details = dict(subject.details)
        record = {"actor": subject.actor, "action": handler.action, "target": subject.target}
        try:
            if policy is not None:
                details.update(policy_version=policy.version, policies=list(decision.policies))
            handler.check(conn, subject, decision)
            if decision.effect == "deny":
                assert policy is not None and subject.facts is not None
                details["request"] = json.dumps(subject.facts.to_json(), sort_keys=True)
                raise handler.denial(policy, decision, subject)
            if self.failed is not None:
                return {**record, "outcome": "error", "reason": self.failed.code, "details": details}
            booked = handler.book(conn, subject, decision, self.now)
        except handler.audited_refusals as exc:
            verdict.denied, verdict.booked = exc, None
            details.update(subject.details)
            return {**record, "outcome": "denied", "reason": exc.code, "details": details}
        verdict.denied, verdict.booked = None, booked
        record["target"] = subject.target  # the bookkeeping may name what it made (policy:v7)
        if booked.quiet:
            return {}
        details.update(subject.details)
        if booked.pending is not None:
            return {**record, "outcome": "pending", "reason": "approval_required", "details": details}
        return {**record, "details": details}


def _no_effect(conn: Connection) -> dict[str, Any]:
    return {}
