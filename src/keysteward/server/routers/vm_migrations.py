"""Live migration of VMs (docs/hosts.md, Migration).

Operators: ``POST /vms/{ref}/migrate {"host": DEST}`` orders the destination to take the VM (the order's
id is the migration's; follow it at ``/vm-orders/{id}``). Hosts (their ``host`` certificate): the
destination asks ``vm.migrate`` with fresh evidence and a CSR (``/vms/{id}/migrations/{mid}/release``),
says where its QEMU listens (``.../ready``, which orders the source to send); the source fetches its
certificate with its lease token (``.../source``), reports its progress while the state moves
(``.../progress``: shown on both orders as ``progress``) and at ``pre-switchover`` asks ``vm.switchover``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Request

from keysteward.access.request import AccessRequest, Delivery, Resource
from keysteward.access.vm_migrate import (
    MigrateReleased,
    ReadyInputs,
    SourceCredentials,
    SourceInputs,
    SwitchoverInputs,
    VmMigrateInputs,
)
from keysteward.errors import Conflict, Denied
from keysteward.identity.principal import Permission, Principal
from keysteward.release import vm_migrations
from keysteward.server.deps import need, request_context, services
from keysteward.server.migration_schemas import (
    MigrateIn,
    MigrateReleasedOut,
    MigrateReleaseIn,
    ProgressIn,
    ReadyIn,
    SourceIn,
    SourceOut,
    SwitchoverIn,
)
from keysteward.server.release_schemas import LeaseOut
from keysteward.server.routers.vms import _host, order_out
from keysteward.server.schemas import b64, unb64
from keysteward.server.vm_schemas import OrderOut, SealedDiskOut

router = APIRouter(tags=["vms"])
Manage = Annotated[Principal, Depends(need(Permission.VOLUME_MANAGE))]
Ref = Annotated[str, Path(min_length=1, max_length=128)]
Id = Annotated[str, Path(max_length=64)]


@router.post("/vms/{ref}/migrate", status_code=202)
def migrate_vm(ref: Ref, body: MigrateIn, request: Request, who: Manage) -> OrderOut:
    svc = services(request)
    vm = svc.vms.find(who.tenant_id, ref)
    now = datetime.now(UTC)
    with svc.db.write() as conn:
        live = svc.vms.running_on(vm.id, now, conn)
        if live is None:
            raise Conflict(f"VM '{vm.name}' is not running on any host", code="vm_not_running")
        if live[0] == body.host:
            raise Conflict(f"VM '{vm.name}' runs on {body.host} already", code="same_host")
        order_id = svc.vms.order(conn, who.tenant_id, vm, body.host, "migrate", who.describe(), now)
        vm_migrations.request(conn, who.tenant_id, vm.id, live[0], body.host, order_id, now)
        svc.audit.append(
            conn, who.tenant_id, actor=who.describe(), action="vm.migration_requested", target=f"vm:{vm.id}",
            details={"migration": order_id, "source": live[0], "destination": body.host},
        )  # fmt: skip
    return order_out(svc.vms.get_order(who.tenant_id, order_id))


@router.post("/vms/{ref}/migration/cancel")
def cancel_migration(ref: Ref, request: Request, who: Manage) -> dict[str, str]:
    """Cancel the VM's migration before its switchover: the guest runs on at its source, the destination lets go."""
    svc = services(request)
    vm = svc.vms.find(who.tenant_id, ref)
    with svc.db.write() as conn:
        migration_id, was = svc.vms.cancel_migration(conn, who.tenant_id, vm, datetime.now(UTC))
        svc.audit.append(
            conn, who.tenant_id, actor=who.describe(), action="vm.migration_cancelled", target=f"vm:{vm.id}",
            details={"migration": migration_id, "state": was},
        )  # fmt: skip
    return {"migration": migration_id, "state": "failed", "was": was}


@router.get("/vms/{vm_id}/migrations/{migration_id}")
async def migration_state(vm_id: Id, migration_id: Id, request: Request) -> dict[str, str]:
    """A migration's state, for its own source and destination hosts (the destination watches it while it
    waits for the state, so a migration failed or cancelled elsewhere ends its wait and its keys at once)."""
    who = await _host(request)
    svc = services(request)

    def read() -> str:
        with svc.db.read() as conn:
            return vm_migrations.state_for_host(conn, who.tenant_id, migration_id, who.name)

    return {"migration": migration_id, "state": await anyio.to_thread.run_sync(read)}


@router.post("/vms/{vm_id}/migrations/{migration_id}/release", response_model=MigrateReleasedOut)
async def migrate_release(vm_id: Id, migration_id: Id, body: MigrateReleaseIn, request: Request) -> MigrateReleasedOut:
    who = await _host(request)
    if who.tenant != body.tenant:
        raise Denied("a host asks only for its own tenant's VMs", code="tenant_mismatch")
    released: MigrateReleased = await services(request).access.decide_async(
        AccessRequest(
            tenant=body.tenant, action="vm.migrate", resource=Resource("Vm", vm_id), delivery=Delivery.SEALED,
            evidence=body.evidence.model_dump(), context=request_context(request),
            inputs=VmMigrateInputs(
                volume_id=vm_id, nonce=body.nonce, suite=body.suite, public_key=unb64(body.public_key),
                host=who.name, hardware=body.hardware.model_dump(), migration_id=migration_id,
                csr_pem=body.csr_pem.encode(),
            ),
        )
    )  # fmt: skip
    if not isinstance(released, MigrateReleased):
        raise Denied("a migration is not held for approval", code="approval_unsupported")
    lease = released.lease
    return MigrateReleasedOut(
        suite=released.suite, sealed=b64(released.sealed), key_version=released.key_version,
        lease=LeaseOut(id=lease.id, expires_at=lease.expires_at, lease_seconds=released.lease_seconds,
                       renew_seconds=released.renew_seconds, grace_seconds=released.grace_seconds),
        disks=[SealedDiskOut(volume_id=d.volume_id, position=d.position, path=d.path, sealed=b64(d.sealed))
               for d in released.disks],
        launch=released.launch, migration=released.migration_id, certificate_pem=released.certificate_pem,
        ca_pem=released.ca_pem, source_dn=released.source_dn, hostname=released.hostname, source=released.source,
        expires_at=released.expires_at,
    )  # fmt: skip


@router.post("/vms/{vm_id}/migrations/{migration_id}/ready")
async def migration_ready(vm_id: Id, migration_id: Id, body: ReadyIn, request: Request) -> dict[str, str]:
    who = await _host(request)
    done: dict[str, str] = await services(request).access.decide_async(
        AccessRequest(tenant=who.tenant, action="vm.migration_ready", resource=Resource("Vm", vm_id),
                      delivery=Delivery.NOTHING, principal=who, context=request_context(request),
                      inputs=ReadyInputs(vm_id, who.name, migration_id, body.address))
    )  # fmt: skip
    return done


@router.post("/vms/{vm_id}/migrations/{migration_id}/source")
async def migration_source(vm_id: Id, migration_id: Id, body: SourceIn, request: Request) -> SourceOut:
    who = await _host(request)
    inputs = SourceInputs(vm_id, who.name, migration_id, body.lease_id, unb64(body.token), body.csr_pem.encode())
    found: SourceCredentials = await services(request).access.decide_async(
        AccessRequest(tenant=who.tenant, action="vm.migration_source", resource=Resource("Vm", vm_id),
                      delivery=Delivery.NOTHING, principal=who, context=request_context(request), inputs=inputs)
    )  # fmt: skip
    return SourceOut(**{name: getattr(found, name) for name in SourceOut.model_fields})


@router.post("/vms/{vm_id}/migrations/{migration_id}/progress", status_code=204)
async def migration_progress(vm_id: Id, migration_id: Id, body: ProgressIn, request: Request) -> None:
    """The source's progress report: not on the access path (no key, no lease moves, not audited, like an
    order's report); only the migration's source may make it, while the migration is ready or switched."""
    who = await _host(request)
    svc = services(request)

    def record() -> None:
        with svc.db.write() as conn:
            vm_migrations.record_progress(conn, who.tenant_id, migration_id, vm_id, who.name,
                                          body.model_dump(exclude_none=True), datetime.now(UTC))  # fmt: skip

    await anyio.to_thread.run_sync(record)


@router.post("/vms/{vm_id}/migrations/{migration_id}/switchover")
async def switchover(vm_id: Id, migration_id: Id, body: SwitchoverIn, request: Request) -> dict[str, object]:
    who = await _host(request)
    inputs = SwitchoverInputs(vm_id, who.name, migration_id, body.lease_id, unb64(body.token))
    done: dict[str, object] = await services(request).access.decide_async(
        AccessRequest(tenant=who.tenant, action="vm.switchover", resource=Resource("Vm", vm_id),
                      delivery=Delivery.NOTHING, principal=who, context=request_context(request), inputs=inputs)
    )  # fmt: skip
    return done
