"""VMs on the access path (docs/hosts.md): create, start, restore, snapshot, revoke, destroy.

``vm.start`` and ``vm.restore`` (Cedar ``vm_start``, ``vm_restore``) are releases to a host: the host proves
itself by its ``host`` certificate, its TPM quote by its enrolled AK over a binding that covers the nonce, its
one-time key and the hardware facts it reports (:func:`~keysteward.attest.binding.host_binding`), and the
policy decides on those facts (``context.platform``, ``context.host``). They run the volume release's steps
(:class:`~keysteward.access.volume_actions.VolumeRelease`) on the VM's key row: the nonce spent, revocations,
a live lease of another host is a suspected clone, approvals, one lease per VM held by the host. Only after
the commit are the VM key and each disk's secret unwrapped and sealed, each to the host's one-time key.

``vm.snapshot`` is asked by the host that holds the VM's live lease (its token proves it): the policy decides
on the facts the lease was granted on; the permit records the snapshot; the host then saves the VM's state
encrypted under the VM key it holds. Nothing is delivered.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Subject
from keysteward.access.admin_actions import VolumeDestroy, VolumeRevoke, authenticated
from keysteward.access.principals import policy_principal
from keysteward.access.release_state import Released, ReleaseState
from keysteward.access.request import AccessRequest, Delivery
from keysteward.access.resources import ReleaseInputs
from keysteward.access.volume_actions import VolumeRelease
from keysteward.attest.binding import canonical_hardware, host_binding
from keysteward.attest.errors import EvidenceRejected
from keysteward.crypto import hpke
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import Conflict, Denied, KeystewardError, NotFound
from keysteward.formats.release_wire import pack_secret, seal_info
from keysteward.keys.keystore import KeyStore
from keysteward.policy.context_facts import host_facts
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.errors import PolicyRequestInvalid
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import HOST_FACTS
from keysteward.policy.store import PolicyStore, PolicyVersion
from keysteward.release import leases
from keysteward.release.nonces import Nonces, decode
from keysteward.release.platform import PlatformVerifier
from keysteward.release.registry import Registry
from keysteward.release.vms import SAVED, VmInfo, Vms, VmSpec, vm_resource
from keysteward.release.volumes import DESTROYED, HostIdentity, VolumeInfo
from keysteward.settings import ReleaseSettings


@dataclass(frozen=True, repr=False)
class VmReleaseInputs(ReleaseInputs):
    """A host's ``vm.start``/``vm.restore``: ``volume_id`` is the VM's id; ``hardware`` its facts as reported."""

    hardware: dict[str, bool] = field(default_factory=dict)
    snapshot_id: str | None = None


@dataclass(frozen=True, repr=False)
class SealedDisk:
    volume_id: str
    position: int
    path: str
    sealed: bytes


@dataclass(frozen=True, repr=False)
class VmReleased(Released):
    """The VM's key (``sealed``) and lease, and each disk's secret sealed to the same one-time key."""

    disks: tuple[SealedDisk, ...] = ()
    snapshot_path: str | None = None
    launch: dict[str, Any] = field(default_factory=dict)
    """What the host needs to launch it: ``name``, ``memory_mb``, ``cpus``, and ``kernel``, ``initrd``, ``append``."""


@dataclass
class _VmRelease(ReleaseState):
    vm: VmInfo | None = None
    disks: list[tuple[VolumeInfo, str, bytes | None]] = field(default_factory=list)


def hardware_facts(raw: Any) -> dict[str, bool]:
    """The facts a host reported, checked as the policy's ``context.host`` checks them (one rule)."""
    try:
        return host_facts(raw)
    except PolicyRequestInvalid as exc:
        raise Denied(f"hardware facts are booleans named {', '.join(HOST_FACTS)}: {exc.message}",
                     code="evidence_invalid") from None  # fmt: skip


class VmStart(VolumeRelease):
    """``vm.start`` (Cedar ``vm_start``): the VM's key and its disks' secrets to a permitted, attested host."""

    action, cedar_action, delivery = "vm.start", "vm_start", Delivery.SEALED
    grants_with_checks = False  # its own checks and bookkeeping (the VM's disks): book grants the lease

    def __init__(
        self,
        registry: Registry,
        vms: Vms,
        keys: KeyStore,
        nonces: Nonces,
        platform: PlatformVerifier,
        policies: PolicyStore,
        settings: ReleaseSettings,
    ) -> None:
        super().__init__(registry, keys, nonces, platform, policies, settings)
        self.vms = vms

    def unknown_tenant(self) -> KeystewardError:
        return Denied("no such VM in this tenant", code="vm_not_found")

    def warm(self, request: AccessRequest, tenant_id: str) -> bool:
        return False

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        inputs: VmReleaseInputs = request.inputs
        spent: tuple[bytes, datetime] | None = None
        try:
            if inputs.host is None:
                raise Denied("a VM is released to a host of the tenant, by its host certificate", code="not_a_host")
            raw = decode(inputs.nonce)
            spent = (raw, self.nonces.check(raw))
            hpke.load_public_key(inputs.suite, inputs.public_key)
            hardware = hardware_facts(inputs.hardware)
            try:
                vm = self.vms.get(tenant_id, inputs.volume_id)
            except NotFound:
                raise Denied("no such VM in this tenant", code="vm_not_found") from None
            disks = [self.registry.for_release(tenant_id, d.volume_id) for d in vm.disks]
            _, key_id, wrapped = self.registry.for_release(tenant_id, vm.id)
        except (Denied, hpke.HpkeError) as exc:
            raise self._refusal(request, tenant_id, exc, spent, None) from None
        caller = HostIdentity(request.tenant, inputs.host)
        reported = {name: hardware[name] for name in HOST_FACTS[:-1]}  # memory_encryption is derived, not sent
        bound = host_binding(raw, inputs.public_key, canonical_hardware(reported))
        try:
            platform, summary = self.platform.verify(tenant_id, caller.key(), request.evidence, binding=bound, now=now)
        except EvidenceRejected as exc:
            denied = Denied(exc.message, code=exc.code)
            raise self._refusal(request, tenant_id, denied, spent, (caller, vm.volume)) from None
        state = _VmRelease(
            inputs, request.tenant, raw, spent[1], vm.volume, key_id, wrapped, caller, vm=vm, disks=disks
        )
        details: dict[str, Any] = {"host": inputs.host, "vm": vm.name, "hardware": hardware}
        if summary:
            details["platform"] = summary
        if request.context.source:
            details["source"] = request.context.source[:64]
        subject = Subject(tenant_id, caller.key(), f"vm:{vm.id}", None, details=details, state=state)
        try:
            subject.facts = PolicyRequest(
                tenant=request.tenant,
                action=self.cedar_action or "",
                principal={"type": "Host", "name": inputs.host},
                resource=vm_resource(vm),
                platform=platform,
                time=now,
                source_ip=request.context.address(),
                identity={"provider": "host", "kind": "host", "account": request.tenant, "instance_id": inputs.host},
                host=hardware,
            )
        except PolicyRequestInvalid as exc:
            raise self._refusal(
                request, tenant_id, Denied(exc.message, code="policy_error"), spent, (caller, vm.volume)
            ) from None
        return subject

    def denial(self, policy: PolicyVersion, decision: PolicyDecision, subject: Subject) -> Denied:
        return ActionHandler.denial(self, policy, decision, subject)

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> VmReleased:
        state: _VmRelease = subject.state
        assert state.vm is not None
        sealed: list[SealedDisk] = []
        for disk, (info, key_id, wrapped) in zip(state.vm.disks, state.disks, strict=True):
            try:
                secret = self.keys.data.open(subject.tenant_id, key_id, info.key_version, info.dek_id, wrapped)
            except Conflict:
                raise Denied(f"the key of disk '{info.name}' was destroyed", code="volume_destroyed") from None
            with secret:
                plaintext = pack_secret(secret.view(), bytes(len(state.token)))
                try:
                    info_bytes = seal_info(state.tenant, info.id, state.lease_id)
                    blob = hpke.seal(state.inputs.suite, state.inputs.public_key, plaintext, info_bytes)
                finally:
                    wipe_bytearray(plaintext)
            sealed.append(SealedDisk(info.id, disk.position, disk.path, blob))
        released = super().deliver(subject, booked, performed)
        fields = {name: getattr(released, name) for name in Released.__dataclass_fields__}
        launch = {"name": state.vm.name, "memory_mb": state.vm.memory_mb, "cpus": state.vm.cpus, **state.vm.launch}
        return VmReleased(**fields, disks=tuple(sealed), snapshot_path=self._snapshot_path(subject), launch=launch)

    def _snapshot_path(self, subject: Subject) -> str | None:
        return None


class VmRestore(VmStart):
    """``vm.restore`` (Cedar ``vm_restore``): a start whose VM resumes from a saved snapshot of its own."""

    action, cedar_action = "vm.restore", "vm_restore"

    def check(self, conn: Connection, subject: Subject, decision: PolicyDecision) -> None:
        state: _VmRelease = subject.state
        inputs = state.inputs
        assert isinstance(inputs, VmReleaseInputs)
        try:
            row = self.vms.snapshot(conn, subject.tenant_id, state.volume.id, inputs.snapshot_id or "")
        except NotFound:
            raise Denied("no such snapshot of this VM", code="snapshot_not_found") from None
        if row.state != SAVED:
            raise Denied(f"snapshot {row.id} is {row.state}, not saved", code="snapshot_not_saved")
        subject.details.update(snapshot=row.id)
        subject.details["snapshot_path"] = row.path
        super().check(conn, subject, decision)

    def _snapshot_path(self, subject: Subject) -> str | None:
        return str(subject.details.get("snapshot_path"))


@dataclass(frozen=True, repr=False)
class SnapshotInputs:
    vm_id: str
    host: str
    lease_id: str
    token: bytes
    path: str


class VmSnapshot(ActionHandler):
    """``vm.snapshot`` (Cedar ``vm_snapshot``): the host holding the VM's live lease may save its state."""

    action, cedar_action, delivery = "vm.snapshot", "vm_snapshot", Delivery.NOTHING

    def __init__(self, registry: Registry, vms: Vms) -> None:
        self.registry = registry
        self.vms = vms

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        inputs: SnapshotInputs = request.inputs
        vm = self.vms.get(tenant_id, inputs.vm_id)
        with self.registry.db.read() as conn:
            row = leases.load(conn, inputs.lease_id, inputs.token)
        if row.volume_id != vm.id or row.holder != f"host:{inputs.host}" or row.state != leases.ACTIVE:
            raise Denied("this host holds no live lease of the VM", code="no_live_lease")
        if not inputs.path.startswith("/") or len(inputs.path) > 1024 or "\x00" in inputs.path:
            raise Denied("a snapshot path is absolute", code="bad_snapshot_path")
        granted = json.loads(row.facts or "{}")
        granted.update(action="vm_snapshot", time=now.isoformat(), resource=vm_resource(vm))
        try:
            facts = PolicyRequest.from_json(granted)
        except PolicyRequestInvalid as exc:
            raise Denied(exc.message, code="policy_error") from None
        details = {"host": inputs.host, "vm": vm.name, "lease": row.id}
        return Subject(tenant_id, f"host:{inputs.host}", f"vm:{vm.id}", facts, details=details, state=(vm, inputs))

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        if decision.effect == "approval":
            raise Denied("a snapshot is not held for approval", code="approval_unsupported")
        vm, inputs = subject.state
        if self.registry.instance_revocation(conn, subject.tenant_id, f"host:{inputs.host}") is not None:
            raise Denied("this host is revoked", code="instance_revoked")
        snapshot_id = self.vms.add_snapshot(conn, subject.tenant_id, vm.id, inputs.host, inputs.path, now)
        subject.details["snapshot"] = snapshot_id
        return Booked(value=snapshot_id)


@dataclass(frozen=True)
class VmCreateInputs:
    spec: VmSpec


class VmCreate(ActionHandler):
    """``vm.create`` (Cedar ``vm_create``): the VM's key made and stored wrapped, its disks attached."""

    action, cedar_action, delivery = "vm.create", "vm_create", Delivery.NOTHING

    def __init__(self, vms: Vms) -> None:
        self.vms = vms

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        who = authenticated(request)
        spec: VmSpec = request.inputs.spec
        spec.check()
        vm_id = str(uuid.uuid4())
        resource = {
            "type": "Vm",
            "id": vm_id,
            "name": spec.name,
            "memory_mb": spec.memory_mb,
            "cpus": spec.cpus,
            "labels": dict(spec.labels),
        }
        facts = PolicyRequest(
            tenant=request.tenant,
            action="vm_create",
            principal=policy_principal(who),
            resource=resource,
            identity={},
            platform={},
            time=now,
        )
        details = {"name": spec.name, "key": spec.key, "disks": [ref for ref, _ in spec.disks]}
        return Subject(tenant_id, who.describe(), f"vm:{vm_id}", facts, details=details, state=(vm_id, spec))

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        if decision.effect == "approval":
            raise Denied("creating a VM is not held for approval", code="approval_unsupported")
        vm_id, spec = subject.state
        return Booked(value=self.vms.insert(conn, subject.tenant_id, spec, vm_id, now))


class _VmAdmin:
    """Revoke and destroy on a VM's key row, asked as ``vm_revoke`` / ``vm_destroy`` on the VM."""

    vms: Vms

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        who = authenticated(request)
        vm = self.vms.find(tenant_id, request.inputs.ref)
        if vm.volume.state == DESTROYED:
            raise Conflict("the VM's key is destroyed already", code="vm_destroyed")
        cedar = getattr(self, "cedar_action", None) or ""
        facts = PolicyRequest(
            tenant=request.tenant,
            action=cedar,
            principal=policy_principal(who),
            resource=vm_resource(vm),
            identity={},
            platform={},
            time=now,
        )
        details: dict[str, Any] = {
            "name": vm.name,
            "reason": request.inputs.reason[:500],
            "shred": getattr(request.inputs, "shred", False),
        }
        return Subject(tenant_id, who.describe(), f"vm:{vm.id}", facts, details=details, state=vm.volume)


class VmRevoke(_VmAdmin, VolumeRevoke):
    action, cedar_action = "vm.revoke", "vm_revoke"

    def __init__(self, registry: Registry, vms: Vms) -> None:
        VolumeRevoke.__init__(self, registry)
        self.vms = vms


class VmDestroy(_VmAdmin, VolumeDestroy):
    """The VM's key is crypto-shredded (its snapshots become unreadable), and so are its disks."""

    action, cedar_action = "vm.destroy", "vm_destroy"

    def __init__(self, registry: Registry, vms: Vms) -> None:
        VolumeDestroy.__init__(self, registry)
        self.vms = vms

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        booked = super().book(conn, subject, decision, now)
        vm = self.vms.get(subject.tenant_id, subject.state.id, conn)
        for disk in vm.disks:
            self.registry.shred_volume(
                conn, subject.tenant_id, self.registry.get(subject.tenant_id, disk.volume_id, conn), now
            )
        subject.details["disks_destroyed"] = [d.name for d in vm.disks]
        return booked


def register(
    table: ActionTable,
    registry: Registry,
    vms: Vms,
    keys: KeyStore,
    nonces: Nonces,
    platform: PlatformVerifier,
    policies: PolicyStore,
    settings: ReleaseSettings,
) -> None:
    table.register(VmCreate(vms))
    table.register(VmStart(registry, vms, keys, nonces, platform, policies, settings))
    table.register(VmRestore(registry, vms, keys, nonces, platform, policies, settings))
    table.register(VmSnapshot(registry, vms))
    table.register(VmRevoke(registry, vms))
    table.register(VmDestroy(registry, vms))
