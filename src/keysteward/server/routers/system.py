"""Health, seal status, unseal and seal.

Unsealing is unauthenticated by design (holding a share is the authority), so it is where an anonymous
client could interfere: every share is checked on its own against its commitment before it counts, so a
forged one never touches the custodians' progress; resetting progress needs a valid share or a system
token with ``seal.manage`` (the root token); bad shares and refused resets are limited per source and
overall (``[seal] unseal_failures_*``). No refusal has a record of its own: they are counted, one record
per interval, action and reason in the system chain (``[audit] refusal_interval``), past the limit as
``rate_limited``.
"""

from __future__ import annotations

import math
import os
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from keysteward import __version__
from keysteward.errors import InvalidShare, KeystewardError, RateLimited, Unauthenticated
from keysteward.identity.principal import SYSTEM_TENANT, Permission, Principal
from keysteward.keys.root import DEV_WARNING
from keysteward.ratelimit import FailureLimiter
from keysteward.server.deps import authorize, need, services
from keysteward.server.schemas import SealStatus, UnsealRequest, UnsealResetRequest

router = APIRouter(tags=["system"])


def _commitments_in_use(request: Request) -> bool:
    root = services(request).root
    try:
        return root.seal_type == "shamir" and root.share_commitments
    except KeystewardError:  # damaged commitments: status still answers; unseal says what is wrong
        return False


def _status(request: Request) -> SealStatus:
    root = services(request).root
    return SealStatus(
        initialized=True,
        sealed=root.sealed,
        seal_type=root.seal_type,
        insecure=root.insecure,
        warning=DEV_WARNING if root.insecure else None,
        threshold=root.threshold,
        progress=root.progress,
        cluster_id=root.cluster_id,
        version=__version__,
        share_commitments=_commitments_in_use(request),
    )


@router.get("/health")
def health(request: Request) -> dict[str, object]:
    root = services(request).root
    return {"status": "ok", "sealed": root.sealed, "process": os.getpid()}


@router.get("/sys/status")
def status(request: Request) -> SealStatus:
    return _status(request)


def _system_tenant_id(request: Request) -> str:
    return services(request).tenants.id_of(SYSTEM_TENANT)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _limiter(request: Request) -> FailureLimiter:
    limiter: FailureLimiter = request.app.state.unseal_limiter
    return limiter


def _refused(request: Request, action: str, exc: KeystewardError) -> RateLimited | None:
    """Count one refusal of this source, under the limit by its reason, past it as ``rate_limited``: into the
    system chain's counted record of the interval (one per action and reason, see audit/refusals.py)."""
    limiter, client = _limiter(request), _client(request)
    already = limiter.retry_after(client)
    limiter.fail(client)
    svc = services(request)
    reason = "rate_limited" if already else exc.code
    svc.refusals.count(_system_tenant_id(request), action, reason, source=client, target="cluster", sample="")
    return _limited(already) if already else None


def _limited(retry_after: float) -> RateLimited:
    seconds = max(1, math.ceil(retry_after))
    return RateLimited(
        f"too many refused unseal requests from this address; try again in {seconds} s", retry_after=seconds
    )


@router.post("/sys/unseal")
def unseal(body: UnsealRequest, request: Request) -> SealStatus:
    """Give one unseal share. Unauthenticated by design: holding a share is the authority."""
    svc = services(request)
    client = _client(request)
    waiting = _limiter(request).retry_after(client)
    if waiting and svc.root.seal_type == "shamir" and not svc.root.share_commitments:
        raise _limited(waiting)  # an old cluster cannot tell a good share from a bad one on its own
    try:
        remaining = svc.root.submit_share(body.share)
    except KeystewardError as exc:
        limited = _refused(request, "seal.unseal_share", exc)
        if limited is not None:
            raise limited from exc
        raise
    system_id = _system_tenant_id(request)
    svc.audit.record(
        system_id,
        actor=f"share-holder@{client}",
        action="seal.unseal_share",
        target="cluster",
        details={"remaining": remaining},
    )
    if remaining == 0:
        svc.audit.record(system_id, actor="server", action="seal.unsealed", target="cluster")
    return _status(request)


@router.post("/sys/unseal/reset")
def unseal_reset(request: Request, body: UnsealResetRequest | None = None) -> SealStatus:
    """Forget the shares given so far: needs a valid share (checked, not counted) or a system token."""
    svc = services(request)
    if request.headers.get("authorization"):
        actor = authorize(request, Permission.SEAL_MANAGE).describe()
    else:
        try:
            if body is None or body.share is None:
                raise Unauthenticated(
                    "resetting unseal progress needs a valid unseal share or the root token",
                    code="reset_needs_share_or_token",
                )
            index = svc.root.verify_share(body.share)
        except (InvalidShare, Unauthenticated) as exc:
            limited = _refused(request, "seal.unseal_reset", exc)
            if limited is not None:
                raise limited from exc
            raise
        actor = f"share-holder:{index}@{_client(request)}"
    svc.audit.record(_system_tenant_id(request), actor=actor, action="seal.unseal_reset", target="cluster")
    svc.root.reset_progress()
    return _status(request)


@router.post("/sys/seal")
def seal(request: Request, who: Annotated[Principal, Depends(need(Permission.SEAL_MANAGE))]) -> SealStatus:
    svc = services(request)
    svc.audit.record(who.tenant_id, actor=who.describe(), action="seal.seal", target="cluster")
    svc.root.seal()
    return _status(request)
