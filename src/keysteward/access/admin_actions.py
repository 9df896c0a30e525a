"""The administrators' actions on the access path: revoke a volume, destroy it, store a policy set.

Each is asked of the tenant's Cedar policy (``volume_revoke``, ``volume_destroy``, ``policy_update``) on top of
the role the REST front-end already requires, so a tenant narrows who may crypto-shred or change its policy
with a ``forbid`` ("volumes labelled prod are destroyed only by bob"). Their state change is written with
the audit record in the access path's one transaction; a denial changes nothing and is audited.

An admin action the policy holds for approval answers ``approval_unsupported``: approvals are for releases.
A policy set that would leave its author without ``policy_update`` is refused before anything is stored
(``policy_lockout``), so a tenant cannot lock every administrator out of its policy by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Subject
from keysteward.access.principals import policy_principal
from keysteward.access.request import AccessRequest, Delivery
from keysteward.access.resources import volume_resource
from keysteward.errors import Conflict, Denied, NotFound
from keysteward.identity.principal import Principal
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.store import PolicyStore, PolicyVersion
from keysteward.release.registry import Registry
from keysteward.release.volumes import DESTROYED, VM, VolumeInfo

MAX_REASON = 500


def authenticated(request: AccessRequest) -> Principal:
    if request.principal is None:
        raise Denied(f"{request.action} needs an authenticated principal", code="no_credentials")
    return request.principal


def _facts(
    request: AccessRequest, action: str, who: Principal, resource: dict[str, Any], now: datetime
) -> PolicyRequest:
    return PolicyRequest(
        tenant=request.tenant,
        action=action,
        principal=policy_principal(who),
        resource=resource,
        identity={},
        platform={},
        time=now,
        source_ip=request.context.address(),
    )


def _no_approval(decision: PolicyDecision, action: str) -> None:
    if decision.effect == "approval":
        raise Denied(f"{action} is not held for approval: approvals are for releases", code="approval_unsupported")


@dataclass(frozen=True)
class VolumeChange:
    """The inputs of ``volume.revoke`` and ``volume.destroy``: the volume (name or id), why, and for a
    revoke whether holders must also wipe their copy (``shred``)."""

    ref: str
    reason: str = ""
    shred: bool = False


class _VolumeAdmin(ActionHandler):
    delivery = Delivery.NOTHING

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        who = authenticated(request)
        inputs: VolumeChange = request.inputs
        volume = self.registry.find(who, inputs.ref)
        if volume.kind == VM:  # a VM's key row: vm revoke / vm destroy
            raise NotFound("no such volume", code="volume_not_found")
        if volume.state == DESTROYED:
            raise Conflict("the volume's key is destroyed already", code="volume_destroyed")
        assert self.cedar_action is not None
        facts = _facts(request, self.cedar_action, who, volume_resource(volume), now)
        details: dict[str, Any] = {"name": volume.name, "reason": inputs.reason[:MAX_REASON]}
        return Subject(tenant_id, who.describe(), f"volume:{volume.id}", facts, details=details, state=volume)


class VolumeRevoke(_VolumeAdmin):
    """``volume.revoke`` (Cedar ``volume_revoke``): holders' next renewal answers ``revoked`` or ``shred``."""

    action, cedar_action = "volume.revoke", "volume_revoke"

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        subject = super().resolve(request, tenant_id, now)
        subject.details["shred"] = request.inputs.shred
        return subject

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        _no_approval(decision, self.action)
        self.registry.mark_revoked(conn, subject.state, shred=subject.details["shred"], now=now)
        return Booked()

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> VolumeInfo:
        return self.registry.changed(subject.state)


class VolumeDestroy(_VolumeAdmin):
    """``volume.destroy`` (Cedar ``volume_destroy``): the secret is crypto-shredded in the transaction."""

    action, cedar_action = "volume.destroy", "volume_destroy"

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        _no_approval(decision, self.action)
        self.registry.shred_volume(conn, subject.tenant_id, subject.state, now)
        return Booked()

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> VolumeInfo:
        return self.registry.changed(subject.state, shredded=True)


class PolicyUpdate(ActionHandler):
    """``policy.update`` (Cedar ``policy_update`` on the tenant): the set in force decides whether its author
    may replace it; the new set is compiled first and must still let its author change it."""

    action, cedar_action, delivery = "policy.update", "policy_update", Delivery.NOTHING

    def __init__(self, policies: PolicyStore) -> None:
        self.policies = policies

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        who = authenticated(request)
        sources: dict[str, str] = request.inputs
        compiled = self.policies.compile_proposed(sources)  # a bad set raises here: nothing is stored
        facts = _facts(request, "policy_update", who, {"type": "Tenant"}, now)
        if compiled.evaluate(facts).effect != "permit":
            raise Conflict(
                "the proposed policy set would not let you change it again (no permit for policy_update): "
                "add one, or keep the built-in roles.cedar",
                code="policy_lockout",
            )
        return Subject(tenant_id, who.describe(), "policy", facts, state=(who, sources, compiled))

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        _no_approval(decision, self.action)
        who, sources, compiled = subject.state
        made, details = self.policies.store(conn, who, sources, compiled, now)
        subject.details.update(details)
        subject.target = f"policy:v{made.version}"
        return Booked(value=made)

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> PolicyVersion:
        made: PolicyVersion = booked.value
        self.policies.stored(subject.tenant_id, made)
        return made


def register(table: ActionTable, registry: Registry, policies: PolicyStore) -> None:
    table.register(VolumeRevoke(registry))
    table.register(VolumeDestroy(registry))
    table.register(PolicyUpdate(policies))
