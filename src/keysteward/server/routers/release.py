"""The key release protocol's front-end (docs/release-protocol.md): challenge, release, renew, end.

These routes take no API token: the evidence in the request is the credential (for a ``host`` of the
tenant, such as the NBD proxy, its mTLS client certificate), and every decision is made by the access
path (:mod:`keysteward.access`). They translate JSON to an ``AccessRequest`` and the decision back; they
never see the key unsealed.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from keysteward.access import challenge as challenges
from keysteward.access.lease_actions import LeaseInputs, RenewAnswer
from keysteward.access.request import AccessRequest, Delivery, Resource
from keysteward.access.resources import ReleaseInputs
from keysteward.errors import Denied
from keysteward.policy.approvals import Waiting
from keysteward.release.nonces import Nonces
from keysteward.server.deps import principal, request_context, services
from keysteward.server.release_schemas import (
    ChallengeOut,
    LeaseOut,
    LeaseToken,
    PendingOut,
    ReleasedOut,
    ReleaseIn,
    RenewOut,
)
from keysteward.server.schemas import b64, unb64
from keysteward.server.services import Services
from keysteward.server.tls import client_cert_der

router = APIRouter(tags=["release"])
LeaseId = Annotated[str, Path(max_length=64)]


def challenge_out(nonces: Nonces) -> ChallengeOut:
    issued = challenges.challenge(nonces)
    return ChallengeOut(
        protocol=issued.protocol, nonce=issued.nonce, expires_at=issued.expires_at, suites=list(issued.suites)
    )


@router.post("/release/challenge")
async def challenge(request: Request) -> ChallengeOut:
    """A fresh nonce. Served by :class:`keysteward.server.release_lanes.ChallengeLane` in the app; this route
    describes it (OpenAPI) and answers where the lane is not installed."""
    return challenge_out(services(request).nonces)


@router.post(
    "/release",
    response_model=ReleasedOut,
    responses={
        202: {"model": PendingOut, "description": "waiting for approval: ask again (fresh evidence) later"},
        403: {"description": "denied, with the reason in `code`"},
    },
)
async def release(body: ReleaseIn, request: Request) -> ReleasedOut | JSONResponse:
    """A volume's key, sealed to the requester. Served by :class:`keysteward.server.release_lanes.ReleaseLane`
    in the app (through :func:`release_answer`, as here); this route describes it and answers what the lane
    passes on (a body that does not validate, which is refused here as everywhere)."""
    answer = await release_answer(services(request), request, body)
    if isinstance(answer, PendingOut):
        return JSONResponse(answer.model_dump(mode="json"), status_code=202)
    return answer


async def release_answer(svc: Services, request: Request, body: ReleaseIn) -> ReleasedOut | PendingOut:
    """The access path's decision on a release, as the protocol answers it: released, or pending approval
    (answered with 202). A refusal raises."""
    decided = await svc.access.decide_async(
        AccessRequest(
            tenant=body.tenant,
            action="volume.release",
            resource=Resource("Volume", body.volume_id),
            delivery=Delivery.SEALED,
            evidence=body.evidence.model_dump(),
            context=request_context(request),
            inputs=ReleaseInputs(
                volume_id=body.volume_id,
                nonce=body.nonce,
                suite=body.suite,
                public_key=unb64(body.public_key),
                host=await _host(svc, request, body.tenant),
                on_behalf_of=body.on_behalf_of,
                requested_by=await _person(request, body.tenant),
            ),
        )
    )
    if isinstance(decided, Waiting):
        return PendingOut(
            request_id=decided.request_id,
            expires_at=decided.expires_at,
            poll_after_seconds=svc.settings.release.approval_poll_seconds,
            approvers=[{"group": g, "quorum": q} for g, q in decided.groups],
        )
    return ReleasedOut(
        suite=decided.suite,
        sealed=b64(decided.sealed),
        key_version=decided.key_version,
        lease=LeaseOut(
            id=decided.lease.id,
            expires_at=decided.lease.expires_at,
            lease_seconds=decided.lease_seconds,
            renew_seconds=decided.renew_seconds,
            grace_seconds=decided.grace_seconds,
        ),
    )


async def _person(request: Request, tenant: str) -> str | None:
    """The person of ``tenant`` whose API token came with the release (they asked for it), or None."""
    header = request.headers.get("authorization", "")
    if not header:
        return None
    who = await anyio.to_thread.run_sync(principal, request)
    if who.tenant != tenant:
        raise Denied("a person asks only for their own tenant's releases", code="tenant_mismatch")
    return who.person or None


async def _host(svc: Services, request: Request, tenant: str) -> str | None:
    """The name of the tenant's host that presented its client certificate, or None (an instance, which
    proves itself by its evidence; an agent's certificate adds nothing to that)."""
    der = client_cert_der(request)
    if not der:
        return None
    cas = svc.cas
    who = cas.seen(der)
    if who is None:
        who = await anyio.to_thread.run_sync(cas.authenticate, der)
    if who.role != "host":
        return None
    if who.tenant != tenant:
        raise Denied("a host releases only its own tenant's volumes", code="tenant_mismatch")
    return who.name


async def _lease_decision(request: Request, action: str, lease_id: str, token: bytes) -> Any:
    """A lease's renewal or end on the event loop, like a release, and the wait for the audit commit holds no
    thread. The renewal protocol names only the lease: its grant (what never changes about it, with its
    tenant) comes from what this process remembers, or is read once in a thread. So a renewal of a lease
    seen before reads nothing before the transaction and takes no worker thread: it never queues behind a
    boot storm's releases there."""
    svc = services(request)
    grant = svc.registry.grants.cached(lease_id)
    if grant is None:
        grant = await anyio.to_thread.run_sync(svc.registry.grants.load, lease_id)
    asked = AccessRequest(
        tenant=grant.tenant,
        action=action,
        resource=Resource("Lease", lease_id),
        delivery=Delivery.NOTHING,
        context=request_context(request),
        inputs=LeaseInputs(lease_id, token, grant),
    )
    return await svc.access.decide_async(asked)


@router.post("/leases/{lease_id}/renew")
async def renew(lease_id: LeaseId, body: LeaseToken, request: Request) -> RenewOut:
    answer: RenewAnswer = await _lease_decision(request, "lease.renew", lease_id, unb64(body.token))
    return RenewOut(action=answer.action, expires_at=answer.expires_at)


@router.post("/leases/{lease_id}/end", status_code=204)
async def end(lease_id: LeaseId, body: LeaseToken, request: Request) -> None:
    await _lease_decision(request, "lease.end", lease_id, unb64(body.token))
