"""Health, seal status, unseal and seal."""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from keysteward import __version__
from keysteward.errors import KeystewardError
from keysteward.identity.principal import SYSTEM_TENANT, Permission, Principal
from keysteward.keys.root import DEV_WARNING
from keysteward.server.deps import need, services
from keysteward.server.schemas import SealStatus, UnsealRequest

router = APIRouter(tags=["system"])


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
    )


@router.get("/health")
def health(request: Request) -> dict[str, object]:
    root = services(request).root
    return {"status": "ok", "sealed": root.sealed, "process": os.getpid()}


@router.get("/sys/status")
def status(request: Request) -> SealStatus:
    return _status(request)


def _system_tenant_id(request: Request) -> str:
    return services(request).tenants.get(SYSTEM_TENANT).id


@router.post("/sys/unseal")
def unseal(body: UnsealRequest, request: Request) -> SealStatus:
    """Give one unseal share. Unauthenticated by design: holding a share is the authority."""
    svc = services(request)
    client = request.client.host if request.client else "unknown"
    system_id = _system_tenant_id(request)
    try:
        remaining = svc.root.submit_share(body.share)
    except KeystewardError as exc:
        svc.audit.record(
            system_id,
            actor=f"share-holder@{client}",
            action="seal.unseal_share",
            target="cluster",
            outcome="denied",
            reason=exc.code,
        )
        raise
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
def unseal_reset(request: Request) -> SealStatus:
    svc = services(request)
    svc.audit.record(_system_tenant_id(request), actor="anonymous", action="seal.unseal_reset", target="cluster")
    svc.root.reset_progress()
    return _status(request)


@router.post("/sys/seal")
def seal(request: Request, who: Annotated[Principal, Depends(need(Permission.SEAL_MANAGE))]) -> SealStatus:
    svc = services(request)
    svc.audit.record(who.tenant_id, actor=who.describe(), action="seal.seal", target="cluster")
    svc.root.seal()
    return _status(request)
