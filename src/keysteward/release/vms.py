"""VMs of hypervisor hosts: their records, disks, orders and snapshots (docs/hosts.md).

A VM's key is a ``volumes`` row of kind ``vm``: a 32-byte secret made and stored wrapped like a volume's,
released only to a host the policy permits, under a lease (the holder is the host), revoked, shredded and
rewrapped by key rotation with the volumes' code. Its disks are registered volumes whose kind becomes
``vm-disk`` when the VM is created: from then on they are released with their VM only, under its lease.

Orders are what an operator asks of a host (``start``, ``stop``, ``snapshot``, ``restore``): the host agent
fetches its pending orders, carries each out through the access path (a start is a ``vm.start`` request
with the host's fresh evidence) and reports what came of it, which ``vm start`` waits for and prints.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from keysteward.errors import BadRequest, Conflict, NotFound
from keysteward.identity.principal import check_name
from keysteward.release import leases, vm_migrations
from keysteward.release.order_bell import OrderBell
from keysteward.release.registry import Registry
from keysteward.release.volumes import ACTIVE, VM, VM_DISK, VOLUME, Binding, VolumeInfo, VolumeSpec
from keysteward.store.db import Database
from keysteward.store.models import Volume
from keysteward.store.vm_models import Vm, VmDisk, VmMigration, VmOrder, VmSnapshot

ORDER_KINDS = ("start", "stop", "snapshot", "suspend", "restore", "migrate", "migrate-out")
PENDING, TAKEN, DONE, FAILED = "pending", "taken", "done", "failed"
SAVING, SAVED = "saving", "saved"
MAX_DISKS = 8
MAX_PATH = 1024
MAX_RESULT = 4096
LAUNCH_FIELDS = ("kernel", "initrd", "append")


@dataclass(frozen=True)
class VmSpec:
    name: str
    key: str
    memory_mb: int
    cpus: int
    disks: tuple[tuple[str, str], ...]
    """``(volume name or id, path on the hosts)`` in the order the guest sees them."""
    launch: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    lease_seconds: int = 60
    renew_seconds: int = 10
    grace_seconds: int | None = None

    def volume_spec(self) -> VolumeSpec:
        return VolumeSpec(
            self.name,
            self.key,
            dict(self.labels),
            Binding(),
            self.lease_seconds,
            self.renew_seconds,
            self.grace_seconds,
        )

    def check(self) -> None:
        check_name("vm", self.name)
        self.volume_spec().check()
        if not 16 <= self.memory_mb <= 1 << 20 or not 1 <= self.cpus <= 256:
            raise BadRequest("memory_mb must be 16-1048576 and cpus 1-256", code="bad_vm")
        if len(self.disks) > MAX_DISKS:
            raise BadRequest(f"a VM has at most {MAX_DISKS} disks", code="bad_vm")
        for ref, path in self.disks:
            if not ref or not path.startswith("/") or len(path) > MAX_PATH or "\x00" in path:
                raise BadRequest("each disk names a volume and an absolute path on the hosts", code="bad_vm")
        unknown = set(self.launch) - set(LAUNCH_FIELDS)
        if unknown or any(not isinstance(v, str) or len(v) > MAX_PATH or "\x00" in v for v in self.launch.values()):
            raise BadRequest(f"launch takes {', '.join(LAUNCH_FIELDS)} (strings)", code="bad_vm")


@dataclass(frozen=True)
class VmDiskInfo:
    position: int
    volume_id: str
    name: str
    path: str


@dataclass(frozen=True)
class VmInfo:
    volume: VolumeInfo
    """The VM's key row: id, name, key, state, labels, lease settings."""
    memory_mb: int
    cpus: int
    launch: dict[str, str]
    disks: tuple[VmDiskInfo, ...]

    @property
    def id(self) -> str:
        return self.volume.id

    @property
    def name(self) -> str:
        return self.volume.name


def vm_resource(vm: VmInfo) -> dict[str, Any]:
    """A VM as the policy's ``resource``."""
    return {
        "type": "Vm",
        "id": vm.id,
        "name": vm.name,
        "memory_mb": vm.memory_mb,
        "cpus": vm.cpus,
        "labels": dict(vm.volume.labels),
    }


@dataclass(frozen=True)
class OrderInfo:
    id: str
    vm_id: str
    vm: str
    host: str
    kind: str
    snapshot_id: str | None
    state: str
    result: dict[str, Any] | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    migration_id: str | None = None
    progress: dict[str, Any] | None = None
    """A ``migrate`` or ``migrate-out`` order's: the source's latest progress report."""


class Vms:
    """The VM records beside the registry's volumes; writes run in the caller's transaction."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.db = registry.db
        self.bell = OrderBell()

    # -- VMs ----------------------------------------------------------------------------------------
    def insert(self, conn: Connection, tenant_id: str, spec: VmSpec, vm_id: str, now: datetime) -> VmInfo:
        """``vm.create``'s bookkeeping: the VM's key (a volume row of kind ``vm``), its disks attached."""
        spec.check()
        disks: list[tuple[int, str, str]] = []
        for position, (ref, path) in enumerate(spec.disks):
            volume = self._volume(conn, tenant_id, ref)
            if volume.kind != VOLUME or volume.state != ACTIVE:
                raise Conflict(f"volume '{volume.name}' is not an active volume free to attach", code="volume_in_use")
            if any(volume.id == d[1] for d in disks):
                raise BadRequest(f"volume '{volume.name}' is named twice", code="bad_vm")
            disks.append((position, volume.id, path))
        self.registry.insert_volume(conn, tenant_id, spec.volume_spec(), vm_id, now, kind=VM)
        conn.execute(
            insert(Vm).values(
                id=vm_id,
                tenant_id=tenant_id,
                memory_mb=spec.memory_mb,
                cpus=spec.cpus,
                launch=json.dumps(dict(spec.launch), sort_keys=True),
                created_at=now,
            )
        )
        for position, volume_id, path in disks:
            conn.execute(insert(VmDisk).values(vm_id=vm_id, position=position, volume_id=volume_id, path=path))
            conn.execute(update(Volume).where(Volume.id == volume_id).values(kind=VM_DISK, changed_at=now))
            self.registry.forget(volume_id)
        return self.get(tenant_id, vm_id, conn)

    def _volume(self, conn: Connection, tenant_id: str, ref: str) -> VolumeInfo:
        row = conn.execute(select(Volume.id).where(Volume.tenant_id == tenant_id, Volume.name == ref)).first()
        return self.registry.get(tenant_id, row.id if row is not None else ref, conn)

    def get(self, tenant_id: str, vm_id: str, conn: Connection | None = None) -> VmInfo:
        if conn is None:
            with self.db.read() as c:
                return self.get(tenant_id, vm_id, c)
        try:
            volume = self.registry.get(tenant_id, vm_id, conn)
        except NotFound:
            raise NotFound("no such VM", code="vm_not_found") from None
        row = conn.execute(select(Vm.__table__).where(Vm.id == vm_id)).first()
        if volume.kind != VM or row is None:
            raise NotFound("no such VM", code="vm_not_found")
        disks = conn.execute(
            select(VmDisk.position, VmDisk.volume_id, VmDisk.path, Volume.name)
            .join(Volume, Volume.id == VmDisk.volume_id)
            .where(VmDisk.vm_id == vm_id)
            .order_by(VmDisk.position)
        ).all()
        return VmInfo(
            volume,
            row.memory_mb,
            row.cpus,
            json.loads(row.launch),
            tuple(VmDiskInfo(d.position, d.volume_id, d.name, d.path) for d in disks),
        )

    def find(self, tenant_id: str, ref: str) -> VmInfo:
        """A VM by name or id."""
        with self.db.read() as conn:
            row = conn.execute(
                select(Volume.id).where(Volume.tenant_id == tenant_id, Volume.name == ref, Volume.kind == VM)
            ).first()
            return self.get(tenant_id, row.id if row is not None else ref, conn)

    def listing(self, tenant_id: str) -> list[VmInfo]:
        with self.db.read() as conn:
            ids = conn.execute(
                select(Volume.id).where(Volume.tenant_id == tenant_id, Volume.kind == VM).order_by(Volume.name)
            ).scalars()
            return [self.get(tenant_id, vm_id, conn) for vm_id in ids]

    def running_on(self, vm_id: str, now: datetime, conn: Connection | None = None) -> tuple[str, datetime] | None:
        """The host holding the VM's live lease and until when, or None."""
        if conn is None:
            with self.db.read() as c:
                return self.running_on(vm_id, now, c)
        live = leases.live_holder(conn, vm_id, now)
        if live is None:
            return None
        return live.holder.removeprefix("host:"), leases.aware(live.expires_at)

    # -- orders -------------------------------------------------------------------------------------
    def order(
        self,
        conn: Connection,
        tenant_id: str,
        vm: VmInfo,
        host: str,
        kind: str,
        actor: str,
        now: datetime,
        snapshot_id: str | None = None,
        *,
        order_id: str | None = None,
        migration_id: str | None = None,
    ) -> str:
        if kind not in ORDER_KINDS:
            raise BadRequest(f"an order is one of {', '.join(ORDER_KINDS)}", code="bad_order")
        check_name("host", host)
        order_id = order_id or str(uuid.uuid4())
        conn.execute(
            insert(VmOrder).values(
                id=order_id,
                tenant_id=tenant_id,
                vm_id=vm.id,
                host=host,
                kind=kind,
                snapshot_id=snapshot_id,
                migration_id=migration_id,
                state=PENDING,
                created_by=actor[:200],
                created_at=now,
                updated_at=now,
            )
        )
        Database.after_commit(conn, lambda: self.bell.ring(tenant_id, host))  # its long-polled fetch wakes
        return order_id

    def take(self, tenant_id: str, host: str, now: datetime) -> list[OrderInfo]:
        """The host's pending orders, marked taken (each is handed out once)."""
        pending = (VmOrder.tenant_id == tenant_id, VmOrder.host == host, VmOrder.state == PENDING)
        with self.db.read() as conn:  # the usual answer is "nothing": found without the write lock
            if conn.execute(select(VmOrder.id).where(*pending).limit(1)).first() is None:
                return []
        with self.db.write() as conn:
            taken: list[OrderInfo] = []
            for order in self._orders(conn, pending):
                done = conn.execute(
                    update(VmOrder)
                    .where(VmOrder.id == order.id, VmOrder.state == PENDING)
                    .values(state=TAKEN, updated_at=now)
                )
                if done.rowcount == 1:  # not taken meanwhile through another server
                    taken.append(order)
        return taken

    def report(
        self, tenant_id: str, host: str, order_id: str, ok: bool, result: Mapping[str, Any], now: datetime
    ) -> None:
        """The host's report on an order it took: done or failed, with what the operator should see."""
        text = json.dumps(dict(result), sort_keys=True)
        if len(text) > MAX_RESULT:
            raise BadRequest(f"a report is at most {MAX_RESULT} bytes of JSON", code="bad_report")
        with self.db.write() as conn:
            done = conn.execute(
                update(VmOrder)
                .where(
                    VmOrder.id == order_id, VmOrder.tenant_id == tenant_id, VmOrder.host == host, VmOrder.state == TAKEN
                )
                .values(state=DONE if ok else FAILED, result=text, updated_at=now)
            )
            if done.rowcount != 1:
                raise NotFound("no such order taken by this host", code="order_not_found")
            row = conn.execute(
                select(VmOrder.kind, VmOrder.snapshot_id, VmOrder.migration_id).where(VmOrder.id == order_id)
            ).one()
            if row.kind in ("migrate", "migrate-out") and not ok:
                vm_migrations.fail(conn, tenant_id, row.migration_id or order_id, now)
            snapshot_id = row.snapshot_id or result.get("snapshot")
            if row.kind in ("snapshot", "suspend") and isinstance(snapshot_id, str):
                size = result.get("size")
                conn.execute(
                    update(VmSnapshot)
                    .where(VmSnapshot.id == snapshot_id, VmSnapshot.tenant_id == tenant_id, VmSnapshot.host == host)
                    .values(state=SAVED if ok else FAILED, size=size if isinstance(size, int) else None)
                )

    def cancel_migration(self, conn: Connection, tenant_id: str, vm: VmInfo, now: datetime) -> tuple[str, str]:
        """An operator's cancel before switchover: the VM's open migration failed (its incoming lease cancelled)
        and its orders not yet taken failed too; (migration id, the state it was in). The hosts converge: the
        destination sees the migration failed while it waits, the source's switchover is refused."""
        row = vm_migrations.open_for_vm(conn, tenant_id, vm.id)
        if row is None:
            raise Conflict(f"VM '{vm.name}' has no migration before its switchover to cancel", code="no_migration")
        vm_migrations.fail(conn, tenant_id, row.id, now)
        text = json.dumps({"code": "migration_cancelled", "message": "the migration was cancelled by an operator"})
        conn.execute(
            update(VmOrder)
            .where(VmOrder.tenant_id == tenant_id, VmOrder.state == PENDING,
                   (VmOrder.id == row.id) | (VmOrder.migration_id == row.id))
            .values(state=FAILED, result=text, updated_at=now)
        )  # fmt: skip
        return str(row.id), str(row.state)

    def get_order(self, tenant_id: str, order_id: str) -> OrderInfo:
        with self.db.read() as conn:
            found = self._orders(conn, (VmOrder.tenant_id == tenant_id, VmOrder.id == order_id))
        if not found:
            raise NotFound("no such order", code="order_not_found")
        return found[0]

    @staticmethod
    def _orders(conn: Connection, where: Sequence[Any]) -> list[OrderInfo]:
        rows = conn.execute(
            select(VmOrder.__table__, Volume.name.label("vm_name"), VmMigration.progress.label("progress"))
            .join(Volume, Volume.id == VmOrder.vm_id)
            .outerjoin(VmMigration, VmMigration.id == func.coalesce(VmOrder.migration_id, VmOrder.id))
            .where(*where)
            .order_by(VmOrder.created_at)
        ).all()
        return [
            OrderInfo(
                r.id,
                r.vm_id,
                r.vm_name,
                r.host,
                r.kind,
                r.snapshot_id,
                r.state,
                json.loads(r.result) if r.result else None,
                r.created_by,
                r.created_at,
                r.updated_at,
                r.migration_id,
                json.loads(r.progress) if r.progress else None,
            )
            for r in rows
        ]

    # -- snapshots ----------------------------------------------------------------------------------
    def add_snapshot(self, conn: Connection, tenant_id: str, vm_id: str, host: str, path: str, now: datetime) -> str:
        snapshot_id = str(uuid.uuid4())
        conn.execute(
            insert(VmSnapshot).values(
                id=snapshot_id, tenant_id=tenant_id, vm_id=vm_id, host=host, path=path, state=SAVING, created_at=now
            )
        )
        return snapshot_id

    def snapshot(self, conn: Connection, tenant_id: str, vm_id: str, snapshot_id: str) -> Any:
        try:
            uuid.UUID(snapshot_id)
        except ValueError:
            raise NotFound("no such snapshot of this VM", code="snapshot_not_found") from None
        row = conn.execute(
            select(VmSnapshot.__table__).where(VmSnapshot.id == snapshot_id, VmSnapshot.tenant_id == tenant_id)
        ).first()
        if row is None or row.vm_id != vm_id:
            raise NotFound("no such snapshot of this VM", code="snapshot_not_found")
        return row

    def snapshots(self, tenant_id: str, vm_id: str) -> list[Any]:
        with self.db.read() as conn:
            return list(
                conn.execute(
                    select(VmSnapshot.__table__)
                    .where(VmSnapshot.tenant_id == tenant_id, VmSnapshot.vm_id == vm_id)
                    .order_by(VmSnapshot.created_at)
                ).all()
            )
