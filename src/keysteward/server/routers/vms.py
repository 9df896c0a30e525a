"""VMs of hypervisor hosts (docs/hosts.md).

Operators (API tokens): create, list, show, revoke and destroy VMs, and order a host to start, stop,
snapshot or restore one (``/vms/{ref}/start`` ...), then follow the order (``/vm-orders/{id}``).
Hosts (their ``host`` client certificate): fetch their orders (``/host/orders``), report on them, and ask
the access path for a VM's keys (``/vms/{id}/release``: ``vm.start`` or ``vm.restore`` with fresh evidence)
and for leave to save its state (``/vms/{id}/snapshots``: ``vm.snapshot``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from keysteward.access.admin_actions import VolumeChange
from keysteward.access.request import AccessRequest, Delivery, Resource
from keysteward.access.vm_actions import SnapshotInputs, VmCreateInputs, VmReleased, VmReleaseInputs
from keysteward.errors import Conflict, Denied, Unauthenticated
from keysteward.identity.principal import Permission, Principal
from keysteward.policy.approvals import Waiting
from keysteward.release.vms import OrderInfo, VmInfo, VmSpec
from keysteward.server.deps import decide_as, need, request_context, services
from keysteward.server.release_schemas import LeaseOut
from keysteward.server.schemas import b64, unb64
from keysteward.server.tls import client_cert_der
from keysteward.server.vm_schemas import (
    DiskOut,
    OrderIn,
    OrderOut,
    ReportIn,
    SealedDiskOut,
    SnapshotIn,
    SnapshotOut,
    VmCreateIn,
    VmOut,
    VmReleasedOut,
    VmReleaseIn,
    VmRevokeIn,
)

router = APIRouter(tags=["vms"])
Manage = Annotated[Principal, Depends(need(Permission.VOLUME_MANAGE))]
Read = Annotated[Principal, Depends(need(Permission.VOLUME_READ))]
Revoke = Annotated[Principal, Depends(need(Permission.VOLUME_REVOKE))]
Ref = Annotated[str, Path(min_length=1, max_length=128)]


def vm_out(request: Request, vm: VmInfo, *, detail: bool = False) -> VmOut:
    svc = services(request)
    now = datetime.now(UTC)
    live = svc.vms.running_on(vm.id, now)
    snapshots = svc.vms.snapshots(vm.volume.tenant_id, vm.id) if detail else []
    return VmOut(
        id=vm.id,
        name=vm.name,
        key=vm.volume.key,
        key_version=vm.volume.key_version,
        state=vm.volume.state,
        memory_mb=vm.memory_mb,
        cpus=vm.cpus,
        labels=vm.volume.labels,
        launch=vm.launch,
        disks=[DiskOut(position=d.position, volume_id=d.volume_id, volume=d.name, path=d.path) for d in vm.disks],
        lease_seconds=vm.volume.lease_seconds,
        renew_seconds=vm.volume.renew_seconds,
        created_at=vm.volume.created_at,
        host=live[0] if live is not None else None,
        lease_expires_at=live[1] if live is not None else None,
        snapshots=[
            SnapshotOut(id=s.id, host=s.host, path=s.path, state=s.state, size=s.size, created_at=s.created_at)
            for s in snapshots
        ],
    )


def order_out(order: OrderInfo) -> OrderOut:
    return OrderOut(**{name: getattr(order, name) for name in OrderOut.model_fields})


# -- operators ---------------------------------------------------------------------------------------


@router.post("/vms", status_code=201)
def create_vm(body: VmCreateIn, request: Request, who: Manage) -> VmOut:
    spec = VmSpec(
        name=body.name,
        key=body.key,
        memory_mb=body.memory_mb,
        cpus=body.cpus,
        disks=tuple((d.volume, d.path) for d in body.disks),
        launch={k: v for k, v in body.launch.model_dump().items() if v is not None},
        labels=dict(body.labels),
        lease_seconds=body.lease_seconds,
        renew_seconds=body.renew_seconds,
        grace_seconds=body.grace_seconds,
    )
    vm: VmInfo = decide_as(request, who, "vm.create", Resource("Vm", body.name), VmCreateInputs(spec))
    return vm_out(request, vm)


@router.get("/vms")
def list_vms(request: Request, who: Read) -> list[VmOut]:
    return [vm_out(request, vm) for vm in services(request).vms.listing(who.tenant_id)]


@router.get("/vms/{ref}")
def show_vm(ref: Ref, request: Request, who: Read) -> VmOut:
    return vm_out(request, services(request).vms.find(who.tenant_id, ref), detail=True)


@router.post("/vms/{ref}/revoke")
def revoke_vm(ref: Ref, body: VmRevokeIn, request: Request, who: Revoke) -> VmOut:
    decide_as(request, who, "vm.revoke", Resource("Vm", ref), VolumeChange(ref, body.reason))
    return vm_out(request, services(request).vms.find(who.tenant_id, ref))


@router.post("/vms/{ref}/destroy")
def destroy_vm(ref: Ref, body: VmRevokeIn, request: Request, who: Manage) -> VmOut:
    decide_as(request, who, "vm.destroy", Resource("Vm", ref), VolumeChange(ref, body.reason))
    return vm_out(request, services(request).vms.find(who.tenant_id, ref))


@router.get("/vm-orders/{order_id}")
def get_order(order_id: Annotated[str, Path(max_length=64)], request: Request, who: Read) -> OrderOut:
    return order_out(services(request).vms.get_order(who.tenant_id, order_id))


# -- hosts -------------------------------------------------------------------------------------------


async def _host(request: Request) -> Principal:
    der = client_cert_der(request)
    if not der:
        raise Unauthenticated("a host presents its host certificate (mutual TLS)", code="no_credentials")
    cas = services(request).cas
    who = cas.seen(der)
    if who is None:
        who = await anyio.to_thread.run_sync(cas.authenticate, der)
    if who.role != "host":
        raise Denied("only a host certificate may do this", code="role_forbidden")
    return who


@router.get("/host/orders")
async def host_orders(
    request: Request,
    wait: Annotated[float, Query(ge=0, le=60, description="Hold the request until an order comes")] = 0,
) -> list[OrderOut]:
    """The host's pending orders; with ``wait``, a long poll: answered the moment an order for it commits
    (held at most ``MAX_WAIT_SECONDS``, 25 s, whatever is asked: under the usual proxies' idle limits)."""
    who = await _host(request)
    vms = services(request).vms

    async def look() -> list[OrderInfo]:
        return await anyio.to_thread.run_sync(vms.take, who.tenant_id, who.name, datetime.now(UTC))

    found = await vms.bell.wait_for(who.tenant_id, who.name, wait, look)
    return [order_out(o) for o in found]


@router.post("/host/orders/{order_id}", status_code=204)
async def host_report(order_id: Annotated[str, Path(max_length=64)], body: ReportIn, request: Request) -> None:
    who = await _host(request)
    if len(json.dumps(body.result)) > 4096:
        raise Conflict("a report is at most 4096 bytes", code="bad_report")
    await anyio.to_thread.run_sync(
        services(request).vms.report, who.tenant_id, who.name, order_id, body.ok, body.result, datetime.now(UTC)
    )


@router.post("/vms/{vm_id}/release", response_model=VmReleasedOut)
async def release_vm(
    vm_id: Annotated[str, Path(max_length=64)], body: VmReleaseIn, request: Request
) -> VmReleasedOut | JSONResponse:
    who = await _host(request)
    if who.tenant != body.tenant:
        raise Denied("a host asks only for its own tenant's VMs", code="tenant_mismatch")
    action = "vm.restore" if body.snapshot is not None else "vm.start"
    released: VmReleased | Waiting = await services(request).access.decide_async(
        AccessRequest(
            tenant=body.tenant,
            action=action,
            resource=Resource("Vm", vm_id),
            delivery=Delivery.SEALED,
            evidence=body.evidence.model_dump(),
            context=request_context(request),
            inputs=VmReleaseInputs(
                volume_id=vm_id,
                nonce=body.nonce,
                suite=body.suite,
                public_key=unb64(body.public_key),
                host=who.name,
                hardware=body.hardware.model_dump(),
                snapshot_id=body.snapshot,
            ),
        )
    )
    if isinstance(released, Waiting):
        body_out = {
            "status": "pending",
            "request_id": released.request_id,
            "expires_at": released.expires_at.isoformat(),
        }
        return JSONResponse(body_out, status_code=202)
    return VmReleasedOut(
        suite=released.suite,
        sealed=b64(released.sealed),
        key_version=released.key_version,
        lease=LeaseOut(
            id=released.lease.id,
            expires_at=released.lease.expires_at,
            lease_seconds=released.lease_seconds,
            renew_seconds=released.renew_seconds,
            grace_seconds=released.grace_seconds,
        ),
        disks=[
            SealedDiskOut(volume_id=d.volume_id, position=d.position, path=d.path, sealed=b64(d.sealed))
            for d in released.disks
        ],
        snapshot_path=released.snapshot_path,
        launch=released.launch,
    )


@router.post("/vms/{vm_id}/snapshots", status_code=201)
async def snapshot_vm(vm_id: Annotated[str, Path(max_length=64)], body: SnapshotIn, request: Request) -> dict[str, str]:
    who = await _host(request)
    inputs = SnapshotInputs(vm_id, who.name, body.lease_id, unb64(body.token), body.path)
    snapshot_id: str = await services(request).access.decide_async(
        AccessRequest(
            tenant=who.tenant,
            action="vm.snapshot",
            resource=Resource("Vm", vm_id),
            delivery=Delivery.NOTHING,
            principal=who,
            context=request_context(request),
            inputs=inputs,
        )
    )
    return {"snapshot": snapshot_id}


# declared last: its path matches /vms/{id}/release and /vms/{id}/snapshots, which must win
@router.post("/vms/{ref}/{kind}", status_code=202)
def order_vm(
    ref: Ref,
    kind: Annotated[str, Path(pattern="^(start|stop|snapshot|suspend|restore)$")],
    body: OrderIn,
    request: Request,
    who: Manage,
) -> OrderOut:
    """An order to a host; the host carries it out through the access path and reports (``/vm-orders/{id}``).
    ``start`` and ``restore`` name the host; ``stop`` and ``snapshot`` go to the host running the VM."""
    svc = services(request)
    vm = svc.vms.find(who.tenant_id, ref)
    now = datetime.now(UTC)
    if kind == "restore" and body.snapshot is None:
        raise Conflict("a restore names the snapshot (snapshot)", code="bad_order")
    with svc.db.write() as conn:
        live = svc.vms.running_on(vm.id, now, conn)
        host = body.host
        if kind in ("stop", "snapshot", "suspend"):
            if live is None:
                raise Conflict(f"VM '{vm.name}' is not running on any host", code="vm_not_running")
            host = live[0]
        if host is None:
            raise Conflict(f"{kind} names the host (host)", code="bad_order")
        order_id = svc.vms.order(conn, who.tenant_id, vm, host, kind, who.describe(), now, snapshot_id=body.snapshot)
        svc.audit.append(
            conn,
            who.tenant_id,
            actor=who.describe(),
            action="vm.order",
            target=f"vm:{vm.id}",
            details={"order": order_id, "kind": kind, "host": host, "snapshot": body.snapshot},
        )
    return order_out(svc.vms.get_order(who.tenant_id, order_id))
