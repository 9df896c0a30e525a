"""Votes on held releases as actions of the access path: ``approval.approve`` and ``approval.deny``.

Both are asked of the tenant's Cedar policy as ``approve`` on the volume the held release is for, so a
tenant can narrow who votes on which volumes ("only officers of the payments team vote on volumes
labelled pci"). The separation-of-duties rules (people not tokens, the requester, recent policy changers,
the cooling-off period, tokens minted by a party) stay in :mod:`keysteward.policy.approvals` and run in the
transaction. Every refused vote is audited with its code, as it was before votes went through this path.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Subject
from keysteward.access.admin_actions import authenticated
from keysteward.access.principals import policy_principal
from keysteward.access.request import AccessRequest, Delivery
from keysteward.access.resources import volume_resource
from keysteward.errors import Denied, KeystewardError, NotFound
from keysteward.policy import approvals
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.store import SEPARATION, PolicyStore
from keysteward.release.registry import Registry
from keysteward.store.models import ApprovalRequest


@dataclass(frozen=True)
class Vote:
    request_id: str
    reason: str


class _Vote(ActionHandler):
    cedar_action, delivery = "approve", Delivery.NOTHING
    audited_refusals = (KeystewardError,)  # voters are proven people: each refused vote keeps its record
    decision = ""

    def __init__(self, registry: Registry, policies: PolicyStore, cooling_off: timedelta) -> None:
        self.registry = registry
        self.policies = policies
        self.cooling_off = cooling_off

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        who = authenticated(request)
        inputs: Vote = request.inputs
        subject = Subject(tenant_id, who.describe(), f"approval:{inputs.request_id[:64]}", None,
                          details={"person": who.person}, state=(who, inputs))  # fmt: skip
        volume_id = self._volume_of(tenant_id, inputs.request_id)
        if volume_id is not None:  # an unknown request is refused (and audited) by approvals.vote
            volume = self.registry.get(tenant_id, volume_id)
            subject.facts = PolicyRequest(
                tenant=request.tenant,
                action="approve",
                principal=policy_principal(who),
                resource=volume_resource(volume),
                identity={},
                platform={},
                time=now,
                source_ip=request.context.address(),
            )
        return subject

    def _volume_of(self, tenant_id: str, request_id: str) -> str | None:
        try:
            uuid.UUID(request_id)
        except ValueError:
            return None
        with self.registry.db.read() as conn:
            found = conn.execute(
                select(ApprovalRequest.volume_id).where(
                    ApprovalRequest.id == request_id, ApprovalRequest.tenant_id == tenant_id
                )
            ).scalar_one_or_none()
        return str(found) if found is not None else None

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        if decision.effect == "approval":
            raise Denied("a vote is not itself held for approval", code="approval_unsupported")
        who, inputs = subject.state
        if subject.facts is None:
            raise NotFound("no such approval request", code="approval_not_found")
        changers = self.policies.changed_by_since(conn, subject.tenant_id, now - SEPARATION)
        outcome = approvals.vote(conn, who, inputs.request_id, self.decision, inputs.reason, now=now,
                                 policy_changers=changers, cooling_off=self.cooling_off)  # fmt: skip
        subject.details.update(
            volume_id=outcome["volume_id"],
            requester=outcome["requester"],
            state=outcome["state"],
            reason=inputs.reason[: approvals.MAX_REASON],
        )
        return Booked(value=outcome)

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> dict[str, Any]:
        outcome: dict[str, Any] = booked.value
        return outcome


class Approve(_Vote):
    action, decision = "approval.approve", approvals.APPROVE


class Deny(_Vote):
    action, decision = "approval.deny", approvals.DENY


def register(table: ActionTable, registry: Registry, policies: PolicyStore, cooling_off: timedelta) -> None:
    table.register(Approve(registry, policies, cooling_off))
    table.register(Deny(registry, policies, cooling_off))
