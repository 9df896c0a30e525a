"""Volumes bound to the key manager, the providers whose identity documents a tenant trusts, revocations."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from keysteward.access.admin_actions import VolumeChange
from keysteward.access.request import Delivery, Resource
from keysteward.access.volume_create import Created, CreateInputs
from keysteward.attest.providers import ProviderTrust, describe_certificate
from keysteward.errors import BadRequest
from keysteward.identity.principal import Permission, Principal
from keysteward.release import instances
from keysteward.release.volumes import Binding, VolumeInfo, VolumeSpec
from keysteward.server.deps import decide_as, need, services
from keysteward.server.release_schemas import (
    DestroyIn,
    InstanceOut,
    InstanceRevokeIn,
    LeaseInfoOut,
    ProviderIn,
    ProviderOut,
    RevokeIn,
    VolumeCreate,
    VolumeCreated,
    VolumeOut,
)
from keysteward.server.schemas import b64, unb64

router = APIRouter(tags=["volumes"])
Manage = Annotated[Principal, Depends(need(Permission.VOLUME_MANAGE))]
Read = Annotated[Principal, Depends(need(Permission.VOLUME_READ))]
Revoke = Annotated[Principal, Depends(need(Permission.VOLUME_REVOKE))]
Ref = Annotated[str, Path(min_length=1, max_length=128)]


def volume_out(info: VolumeInfo, tenant: str) -> VolumeOut:
    return VolumeOut(
        id=info.id,
        tenant=tenant,
        name=info.name,
        key=info.key,
        key_version=info.key_version,
        labels=info.labels,
        binding=info.binding.as_dict(),
        state=info.state,
        lease_seconds=info.lease_seconds,
        renew_seconds=info.renew_seconds,
        grace_seconds=info.grace_seconds,
        created_at=info.created_at,
    )


@router.post("/volumes", status_code=201)
def create_volume(body: VolumeCreate, request: Request, who: Manage) -> VolumeCreated:
    spec = VolumeSpec(
        name=body.name,
        key=body.key,
        labels=dict(body.labels),
        binding=Binding.parse(body.binding.model_dump(exclude_none=True)),
        lease_seconds=body.lease_seconds,
        renew_seconds=body.renew_seconds,
        grace_seconds=body.grace_seconds,
    )
    inputs = CreateInputs(spec, body.suite, unb64(body.public_key))
    created: Created = decide_as(
        request, who, "volume.register", Resource("Volume", body.name), inputs, Delivery.SEALED
    )
    return VolumeCreated(volume=volume_out(created.volume, who.tenant), suite=created.suite, sealed=b64(created.sealed))


@router.get("/volumes")
def list_volumes(request: Request, who: Read) -> list[VolumeOut]:
    return [volume_out(v, who.tenant) for v in services(request).registry.list(who)]


@router.get("/volumes/{ref}")
def get_volume(ref: Ref, request: Request, who: Read) -> VolumeOut:
    return volume_out(services(request).registry.find(who, ref), who.tenant)


@router.post("/volumes/{ref}/revoke")
def revoke_volume(ref: Ref, body: RevokeIn, request: Request, who: Revoke) -> VolumeOut:
    change = VolumeChange(ref, reason=body.reason, shred=body.shred)
    return volume_out(_admin(request, who, "volume.revoke", change), who.tenant)


@router.post("/volumes/{ref}/destroy")
def destroy_volume(ref: Ref, body: DestroyIn, request: Request, who: Manage) -> VolumeOut:
    return volume_out(_admin(request, who, "volume.destroy", VolumeChange(ref, reason=body.reason)), who.tenant)


def _admin(request: Request, who: Principal, action: str, change: VolumeChange) -> VolumeInfo:
    info: VolumeInfo = decide_as(request, who, action, Resource("Volume", change.ref), change)
    return info


@router.post("/instances/revoke", status_code=204)
def revoke_instance(body: InstanceRevokeIn, request: Request, who: Revoke) -> None:
    if body.host is not None and not (body.provider or body.account or body.instance_id):
        holder = f"host:{body.host}"
    elif body.host is None and body.provider and body.account and body.instance_id:
        holder = f"{body.provider}/{body.account}/{body.instance_id}"
    else:
        raise BadRequest("name either a host, or an instance by provider, account and instance_id", code="bad_instance")
    services(request).registry.revoke_instance(who, holder, shred=body.shred, reason=body.reason)


@router.get("/instances")
def list_instances(request: Request, who: Read) -> list[InstanceOut]:
    """Every instance or host that held a lease of the tenant, or was revoked: live leases, last release."""
    with services(request).db.read() as conn:
        found = instances.listing(conn, who.tenant_id, datetime.now(UTC))
    return [InstanceOut(**dataclasses.asdict(info)) for info in found]


@router.get("/leases")
def list_leases(
    request: Request, who: Read, volume: Annotated[str | None, Query(max_length=128)] = None
) -> list[LeaseInfoOut]:
    svc = services(request)
    volume_id = svc.registry.find(who, volume).id if volume else None
    found = svc.registry.leases(who.tenant_id, volume_id)
    return [
        LeaseInfoOut(
            id=lease.id,
            volume_id=lease.volume_id,
            holder=lease.holder,
            state=lease.state,
            created_at=lease.created_at,
            renewed_at=lease.renewed_at,
            expires_at=lease.expires_at,
        )
        for lease in found
    ]


@router.post("/providers", status_code=201)
def add_provider(body: ProviderIn, request: Request, who: Manage) -> ProviderOut:
    trust = services(request).registry.add_provider(who, body.name, body.kind, body.certificates_pem, body.audience)
    return _provider_out(trust)


def _provider_out(trust: ProviderTrust) -> ProviderOut:
    return ProviderOut(
        name=trust.name,
        kind=trust.kind,
        audience=trust.audience,
        certificates=[describe_certificate(c) for c in trust.certificates],
    )


@router.get("/providers")
def list_providers(request: Request, who: Read) -> list[ProviderOut]:
    return [
        ProviderOut(
            name=t.name,
            kind=t.kind,
            audience=t.audience,
            certificates=[describe_certificate(c) for c in t.certificates],
        )
        for t in services(request).registry.trusts(who.tenant_id)
    ]


@router.delete("/providers/{name}", status_code=204)
def remove_provider(name: Ref, request: Request, who: Manage) -> None:
    services(request).registry.remove_provider(who, name)
