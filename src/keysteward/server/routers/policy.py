"""The tenant's Cedar policy set (versions, dry runs) and the approvals it asks for (docs/policy.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import Field

from keysteward.access.approval_actions import Vote
from keysteward.access.request import Resource
from keysteward.identity.principal import Permission, Principal
from keysteward.policy import approvals
from keysteward.policy.engine import CompiledPolicySet, PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.store import PolicyVersion, in_force
from keysteward.server.deps import decide_as, need, services
from keysteward.server.schemas import Strict

router = APIRouter(tags=["policy"])
Manage = Annotated[Principal, Depends(need(Permission.POLICY_MANAGE))]
Read = Annotated[Principal, Depends(need(Permission.POLICY_READ))]
ApprovalsRead = Annotated[Principal, Depends(need(Permission.APPROVAL_READ))]
Decide = Annotated[Principal, Depends(need(Permission.APPROVAL_DECIDE))]
Sources = Annotated[
    dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.cedar$")], str], Field(max_length=64)
]


class PolicyIn(Strict):
    sources: Sources


class PolicyOut(Strict):
    version: int
    digest: str
    created_by: str
    created_at: datetime | None
    policies: list[str]
    sources: dict[str, str]


class TestIn(Strict):
    request: dict[str, Any]
    sources: Sources | None = None
    version: Annotated[int, Field(ge=0)] | None = None


class DecisionOut(Strict):
    effect: str
    reason: str
    policies: list[str]
    errors: list[str]
    approval: dict[str, Any] | None
    policy_version: int | None


class VoteIn(Strict):
    reason: Annotated[str, Field(min_length=1, max_length=500)]


def _out(found: PolicyVersion) -> PolicyOut:
    return PolicyOut(
        version=found.version,
        digest=found.digest,
        created_by=found.created_by,
        created_at=found.created_at,
        policies=list(found.compiled.ids),
        sources=found.sources,
    )


def decision_out(decision: PolicyDecision, version: int | None) -> DecisionOut:
    approval = None
    if decision.approval is not None:
        approval = {
            "groups": [{"group": g, "quorum": q} for g, q in decision.approval.groups],
            "valid_for_seconds": decision.approval.valid_for_seconds,
        }
    return DecisionOut(
        effect=decision.effect,
        reason=decision.reason,
        policies=list(decision.policies),
        errors=list(decision.errors),
        approval=approval,
        policy_version=version,
    )


@router.get("/policy")
def policy_show(request: Request, who: Read) -> PolicyOut:
    return _out(services(request).policies.current(who.tenant_id))


@router.put("/policy")
def policy_set(body: PolicyIn, request: Request, who: Manage) -> PolicyOut:
    stored: PolicyVersion = decide_as(request, who, "policy.update", Resource("Tenant", who.tenant), dict(body.sources))
    return _out(stored)


@router.get("/policy/versions")
def policy_versions(request: Request, who: Read) -> list[dict[str, Any]]:
    return services(request).policies.history(who.tenant_id)


@router.get("/policy/versions/{version}")
def policy_version(version: Annotated[int, Path(ge=0, le=2**31)], request: Request, who: Read) -> PolicyOut:
    return _out(services(request).policies.get(who.tenant_id, version))


@router.post("/policy/test")
def policy_test(body: TestIn, request: Request, who: Read) -> DecisionOut:
    """Dry run: the decision of the current, an earlier or a proposed set for a recorded or written request."""
    store = services(request).policies
    facts = PolicyRequest.from_json({**body.request, "tenant": who.tenant})
    if body.sources is not None:
        return decision_out(CompiledPolicySet.compile(in_force(body.sources)).evaluate(facts), None)
    found = store.current(who.tenant_id) if body.version is None else store.get(who.tenant_id, body.version)
    return decision_out(found.compiled.evaluate(facts), found.version)


@router.get("/approvals")
def approvals_list(
    request: Request,
    who: ApprovalsRead,
    state: Annotated[str | None, Query(pattern="^(pending|approved|denied|expired|used)$")] = None,
) -> list[dict[str, Any]]:
    with services(request).db.read() as conn:
        found = approvals.listing(conn, who.tenant_id, None if state == "expired" else state, datetime.now(UTC))
    return [a for a in found if state is None or a["state"] == state]


def _vote(request: Request, who: Principal, request_id: str, decision: str, reason: str) -> dict[str, Any]:
    outcome: dict[str, Any] = decide_as(
        request, who, f"approval.{decision}", Resource("Approval", request_id), Vote(request_id, reason)
    )
    return outcome


@router.post("/approvals/{request_id}/approve")
def approve(
    request_id: Annotated[str, Path(max_length=64)], body: VoteIn, request: Request, who: Decide
) -> dict[str, Any]:
    return _vote(request, who, request_id, approvals.APPROVE, body.reason)


@router.post("/approvals/{request_id}/deny")
def deny(
    request_id: Annotated[str, Path(max_length=64)], body: VoteIn, request: Request, who: Decide
) -> dict[str, Any]:
    return _vote(request, who, request_id, approvals.DENY, body.reason)
