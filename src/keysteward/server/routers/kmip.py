"""The KMIP front-end for administrators: listener status, hypervisor clients, objects (no material), and the
pinned self-signed client certificates of trust mode C (``keysteward kmip client add|list|remove``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import Field

from keysteward.identity.principal import Permission, Principal
from keysteward.server.deps import need, services
from keysteward.server.schemas import Name, Strict

router = APIRouter(prefix="/kmip", tags=["kmip"])
Read = Annotated[Principal, Depends(need(Permission.KEY_READ))]
Manage = Annotated[Principal, Depends(need(Permission.CA_MANAGE))]
CaRead = Annotated[Principal, Depends(need(Permission.CA_READ))]


class PinIn(Strict):
    name: Name
    cert_pem: Annotated[str, Field(min_length=1, max_length=64 * 1024)]


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


@router.post("/client-pins", status_code=201)
def pin_client(body: PinIn, request: Request, who: Manage) -> dict[str, Any]:
    """Trust mode C: accept exactly this self-signed certificate as the hypervisor NAME of the caller's tenant."""
    return services(request).kmip_pins.add(who, body.name, body.cert_pem)


@router.get("/client-pins")
def pinned_clients(request: Request, who: CaRead) -> list[dict[str, Any]]:
    return services(request).kmip_pins.listing(who.tenant_id)


@router.delete("/client-pins/{name}")
def unpin_client(request: Request, who: Manage, name: Annotated[str, Path(max_length=64)]) -> dict[str, Any]:
    return services(request).kmip_pins.remove(who, name)
