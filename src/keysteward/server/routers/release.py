"""The key release protocol's front-end (docs/release-protocol.md): challenge, release, renew, end.

These routes take no API token: the evidence in the request is the credential (for a ``host`` of the
tenant, such as the NBD proxy, its mTLS client certificate), and every decision is made by
:class:`keysteward.release.service.ReleaseService`. They translate JSON to a
``ReleaseRequest`` and the decision back; they never see the key unsealed.
"""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from keysteward.crypto.hpke import SUITES
from keysteward.errors import Denied
from keysteward.policy.approvals import Waiting
from keysteward.release.service import PROTOCOL, ReleaseRequest
from keysteward.server.deps import services
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
from keysteward.server.tls import client_cert_der

router = APIRouter(tags=["release"])
LeaseId = Annotated[str, Path(max_length=64)]


@router.post("/release/challenge")
async def challenge(request: Request) -> ChallengeOut:
    nonce, expires_at = services(request).release.challenge()
    return ChallengeOut(protocol=PROTOCOL, nonce=nonce, expires_at=expires_at, suites=list(SUITES))


@router.post(
    "/release",
    response_model=ReleasedOut,
    responses={
        202: {"model": PendingOut, "description": "waiting for approval: ask again (fresh evidence) later"},
        403: {"description": "denied, with the reason in `code`"},
    },
)
async def release(body: ReleaseIn, request: Request) -> ReleasedOut | JSONResponse:
    svc = services(request)
    decided = await svc.release.decide_async(
        ReleaseRequest(
            tenant=body.tenant,
            volume_id=body.volume_id,
            nonce=body.nonce,
            suite=body.suite,
            public_key=unb64(body.public_key),
            evidence=body.evidence.model_dump(),
            source=request.client.host if request.client else "",
            host=await _host(request, body.tenant),
            on_behalf_of=body.on_behalf_of,
        )
    )
    if isinstance(decided, Waiting):
        pending = PendingOut(
            request_id=decided.request_id,
            expires_at=decided.expires_at,
            poll_after_seconds=svc.settings.release.approval_poll_seconds,
            approvers=[{"group": g, "quorum": q} for g, q in decided.groups],
        )
        return JSONResponse(pending.model_dump(mode="json"), status_code=202)
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


async def _host(request: Request, tenant: str) -> str | None:
    """The name of the tenant's host that presented its client certificate, or None (an instance, which
    proves itself by its evidence; an agent's certificate adds nothing to that)."""
    der = client_cert_der(request)
    if not der:
        return None
    cas = services(request).cas
    who = cas.seen(der)
    if who is None:
        who = await anyio.to_thread.run_sync(cas.authenticate, der)
    if who.role != "host":
        return None
    if who.tenant != tenant:
        raise Denied("a host releases only its own tenant's volumes", code="tenant_mismatch")
    return who.name


@router.post("/leases/{lease_id}/renew")
def renew(lease_id: LeaseId, body: LeaseToken, request: Request) -> RenewOut:
    action, expires_at = services(request).release.renew(lease_id, unb64(body.token))
    return RenewOut(action=action, expires_at=expires_at)


@router.post("/leases/{lease_id}/end", status_code=204)
def end(lease_id: LeaseId, body: LeaseToken, request: Request) -> None:
    services(request).release.end(lease_id, unb64(body.token))
