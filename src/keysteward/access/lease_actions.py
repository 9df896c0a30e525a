"""Lease renewal and lease end as actions of the access path (docs/release-protocol.md).

``lease.renew`` asks the policy again (Cedar ``release`` with the facts the lease was granted on, at the
current time and policy version, and ``renew``): a policy change that no longer permits the holder turns
its next renewal into ``revoked``; a destroyed volume or key, a shredded secret or a shredding revocation
answers ``shred``. A permit that needs approval keeps the lease going: the approval was given for this
lease. ``lease.end`` asks nothing: giving a key back is always allowed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Subject
from keysteward.access.request import AccessRequest, Delivery
from keysteward.errors import KeystewardError, NotFound
from keysteward.lru import Lru
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.errors import PolicyRequestInvalid
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import RENEWAL_OF
from keysteward.policy.store import PolicyStore, PolicyVersion
from keysteward.release import leases
from keysteward.release.registry import Registry
from keysteward.release.volumes import ACTIVE, DESTROYED, SHRED, actor_of
from keysteward.store.models import DataKey, Volume

log = logging.getLogger("keysteward.release")
_VOLUME = (
    select(Volume.state, Volume.lease_seconds, DataKey.wrapped.is_(None).label("shredded"))
    .join(DataKey, DataKey.id == Volume.dek_id)
    .where(Volume.id == bindparam("volume_id"))
)
"""Built once, its value bound at execution: every renewal reads it on the audit writer thread."""
RENEWAL_ANSWERS = 16384
"""Renewal answers remembered per server process (by tenant, policy version and digest, and lease facts)."""


@dataclass(frozen=True, repr=False)
class LeaseInputs:
    lease_id: str
    token: bytes
    grant: leases.Grant
    """What the lease was granted with (``Registry.grants``): the front-end needed it for the tenant's name."""


@dataclass(frozen=True)
class RenewAnswer:
    action: str
    """``continue``, ``revoked``, ``shred`` or ``expired``."""
    expires_at: datetime


class _LeaseAction(ActionHandler):
    def __init__(self, registry: Registry, policies: PolicyStore) -> None:
        self.registry = registry
        self.policies = policies
        self._answers: Lru[tuple[str, int, str, str], _Asked] = Lru(RENEWAL_ANSWERS)

    def unknown_tenant(self) -> KeystewardError:
        return NotFound("no such lease, or not this token", code="lease_not_found")

    def warm(self, request: AccessRequest, tenant_id: str) -> bool:
        """Always: the request carries the lease's grant, so resolving reads nothing (on the event loop, a
        renewal of a live lease never waits for a worker thread behind a boot storm's releases)."""
        return True

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        """The token checked against the lease's grant; whether the lease is still live is for ``book``."""
        inputs: LeaseInputs = request.inputs
        grant = inputs.grant
        if not grant.opens(inputs.token) or grant.tenant_id != tenant_id:
            raise NotFound("no such lease, or not this token", code="lease_not_found")
        state = self._state(inputs, now)
        return Subject(tenant_id, actor_of(grant.holder), f"volume:{grant.volume_id}", None, state=state)

    def _state(self, inputs: LeaseInputs, now: datetime) -> Any:
        return inputs


@dataclass(frozen=True)
class _Asked:
    """The policy's answer to a renewal: for the lease's facts, under one policy version, at one time."""

    facts: str | None
    version: int
    permitted: bool
    details: dict[str, Any]


@dataclass(frozen=True, repr=False)
class _Renewal:
    inputs: LeaseInputs
    asked: _Asked


class LeaseRenew(_LeaseAction):
    action, cedar_action, delivery = "lease.renew", None, Delivery.NOTHING
    first = True  # ahead of new releases at the audit writer: renewals of live leases never queue behind a boot

    def _state(self, inputs: LeaseInputs, now: datetime) -> _Renewal:
        """The policy is asked here, before the transaction (the audit writer runs every renewal's book one
        after another: Cedar there was half of its time); ``book`` asks again only if the lease's facts or
        the policy version changed in between."""
        return _Renewal(inputs, self._ask(inputs.grant.tenant_id, inputs.grant.facts, now))

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        renewal: _Renewal = subject.state
        inputs = renewal.inputs
        row = leases.load(conn, inputs.lease_id, inputs.token)
        volume = conn.execute(_VOLUME, {"volume_id": row.volume_id}).one()
        instance = self.registry.instance_revocation(conn, row.tenant_id, row.holder)
        expires = leases.aware(row.expires_at)
        subject.details["lease"] = row.id
        if row.state in (leases.REVOKED, leases.SHRED):
            action = row.state
        elif row.state == leases.ENDED and row.holder.startswith("host:"):
            action = "ended"  # a VM's lease ended under its host (a migration's switchover): stop, do not ask again
        elif row.state != leases.ACTIVE or expires <= now:
            action = "expired"
            if row.state == leases.ACTIVE:
                leases.set_state(conn, row.id, leases.EXPIRED, now)
        elif volume.state in (SHRED, DESTROYED) or volume.shredded or instance is True:
            action = leases.SHRED
        elif volume.state != ACTIVE or instance is False:
            action = leases.REVOKED
        elif not self._still_permitted(subject, row, now):
            action = leases.REVOKED
        else:
            return Booked(RenewAnswer("continue", leases.extend(conn, row.id, now, volume.lease_seconds)), quiet=True)
        if action in (leases.REVOKED, leases.SHRED) and row.state == leases.ACTIVE:
            leases.set_state(conn, row.id, action, now)
        subject.details["answer"] = action
        return Booked(RenewAnswer(action, expires), quiet=action == row.state)  # delivered before: recorded

    def _still_permitted(self, subject: Subject, row: Any, now: datetime) -> bool:
        """The policy in force asked again with the facts the lease was granted on, at ``now`` (the answer
        asked before the transaction, unless the lease's facts or the policy version changed since)."""
        asked: _Asked = subject.state.asked
        if asked.facts != row.facts or asked.version != self.policies.current(subject.tenant_id).version:
            asked = self._ask(subject.tenant_id, row.facts, now)
        subject.details.update(asked.details)
        return asked.permitted

    def _ask(self, tenant_id: str, facts: str | None, now: datetime) -> _Asked:
        policy = self.policies.current(tenant_id)
        if facts is None:
            return _Asked(facts, policy.version, True, {})  # granted before renewals asked the policy
        if policy.compiled.reads_time:
            return self._decide(policy, facts, now)
        # no policy reads the time: the answer depends on the lease's facts and the set alone, and a lease's
        # renewals (every renew interval, for as long as it lives) ask the same question again
        known = (tenant_id, policy.version, policy.digest, facts)
        return self._answers.get_or_make(known, lambda: self._decide(policy, facts, now))

    def _decide(self, policy: PolicyVersion, facts: str, now: datetime) -> _Asked:
        try:
            granted = json.loads(facts)
            granted["time"] = now.isoformat()
            release = PolicyRequest.from_json(granted)
            renew = PolicyRequest.from_json({**granted, "action": RENEWAL_OF.get(granted.get("action"), "renew")})
        except (PolicyRequestInvalid, ValueError) as exc:
            log.warning("a lease's facts no longer make a policy request: %s", type(exc).__name__)
            return _Asked(facts, policy.version, False, {"policy_version": policy.version, "reason": "policy_error"})
        decided = policy.compiled.evaluate(release)
        renewal = policy.compiled.evaluate(renew)
        if decided.effect == "deny" or renewal.reason in ("forbidden_by_policy", "policy_error"):
            details = {
                "policy_version": policy.version,
                "policies": list(decided.policies + renewal.policies),
                "reason": decided.reason if decided.effect == "deny" else renewal.reason,
            }
            return _Asked(facts, policy.version, False, details)
        return _Asked(facts, policy.version, True, {})


class LeaseEnd(_LeaseAction):
    action, cedar_action, delivery = "lease.end", None, Delivery.NOTHING

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        inputs: LeaseInputs = subject.state
        row = leases.load(conn, inputs.lease_id, inputs.token)
        if row.state != leases.ACTIVE:
            return Booked(quiet=True)
        leases.set_state(conn, row.id, leases.ENDED, now)
        subject.details["lease"] = row.id
        return Booked()


def register(table: ActionTable, registry: Registry, policies: PolicyStore) -> None:
    table.register(LeaseRenew(registry, policies))
    table.register(LeaseEnd(registry, policies))
