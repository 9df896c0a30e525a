"""Bodies of the VM routes (docs/hosts.md): operators' VMs and orders, hosts' releases and reports."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import Field

from keysteward.server.release_schemas import Evidence, Labels, LeaseOut, Suite, Uuid
from keysteward.server.schemas import B64, Name, Strict

Path_ = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^/[^\x00]*$")]
Reason = Annotated[str, Field(max_length=500)]


class DiskIn(Strict):
    volume: Annotated[str, Field(min_length=1, max_length=128)]
    path: Path_


class LaunchIn(Strict):
    kernel: Path_ | None = None
    initrd: Path_ | None = None
    append: Annotated[str, Field(max_length=1024)] | None = None


class VmCreateIn(Strict):
    name: Name
    key: Name
    memory_mb: Annotated[int, Field(ge=16, le=1 << 20)] = 512
    cpus: Annotated[int, Field(ge=1, le=256)] = 1
    disks: Annotated[list[DiskIn], Field(max_length=8)] = []
    launch: LaunchIn = LaunchIn()
    labels: Labels = {}
    lease_seconds: Annotated[int, Field(ge=5, le=86400)] = 60
    renew_seconds: Annotated[int, Field(ge=1, le=43200)] = 10
    grace_seconds: Annotated[int, Field(ge=0, le=86400)] | None = None


class DiskOut(Strict):
    position: int
    volume_id: str
    volume: str
    path: str


class SnapshotOut(Strict):
    id: str
    host: str
    path: str
    state: str
    size: int | None
    created_at: datetime


class VmOut(Strict):
    id: str
    name: str
    key: str
    key_version: int
    state: str
    memory_mb: int
    cpus: int
    labels: dict[str, str]
    launch: dict[str, str]
    disks: list[DiskOut]
    lease_seconds: int
    renew_seconds: int
    created_at: datetime
    host: str | None = None
    """The host holding the VM's live lease, if any."""
    lease_expires_at: datetime | None = None
    snapshots: list[SnapshotOut] = []


class OrderIn(Strict):
    host: Name | None = None
    snapshot: Uuid | None = None


class VmRevokeIn(Strict):
    reason: Reason = ""


class OrderOut(Strict):
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


class HostFactsIn(Strict):
    kvm: bool = False
    sev: bool = False
    sev_es: bool = False
    sev_snp: bool = False
    tdx: bool = False


class VmReleaseIn(Strict):
    protocol: Annotated[str, Field(pattern=r"^keysteward-release/1$")] = "keysteward-release/1"
    tenant: Name
    nonce: Annotated[str, Field(min_length=1, max_length=64)]
    suite: Suite = "x25519"
    public_key: B64
    evidence: Evidence
    hardware: HostFactsIn
    snapshot: Uuid | None = None


class SealedDiskOut(Strict):
    volume_id: str
    position: int
    path: str
    sealed: str


class VmReleasedOut(Strict):
    status: str = "released"
    suite: str
    sealed: str
    key_version: int
    lease: LeaseOut
    disks: list[SealedDiskOut]
    snapshot_path: str | None = None
    launch: dict[str, Any] = {}


class SnapshotIn(Strict):
    lease_id: Uuid
    token: B64
    path: Path_


class ReportIn(Strict):
    ok: bool
    result: Annotated[dict[Annotated[str, Field(max_length=64)], Any], Field(max_length=32)] = {}
