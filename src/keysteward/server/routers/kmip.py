"""The KMIP front-end's state for administrators: listener status, hypervisor clients, objects (no material)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from keysteward.identity.principal import Permission, Principal
from keysteward.server.deps import need, services

router = APIRouter(prefix="/kmip", tags=["kmip"])
Read = Annotated[Principal, Depends(need(Permission.KEY_READ))]


@router.get("/status")
def kmip_status(request: Request, who: Read) -> dict[str, Any]:
    svc = services(request)
    return svc.kmip_report.status(who.tenant_id, svc.settings.kmip.listen)


@router.get("/clients")
def kmip_clients(request: Request, who: Read) -> list[dict[str, Any]]:
    return services(request).kmip_report.clients(who.tenant_id)


@router.get("/objects")
def kmip_objects(
    request: Request, who: Read, stale_days: Annotated[int | None, Query(ge=0, le=36500)] = None
) -> list[dict[str, Any]]:
    return services(request).kmip_report.objects(who.tenant_id, stale_days)
