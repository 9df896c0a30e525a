"""Live migration on the access path (docs/hosts.md, Migration): ``vm.migrate`` and ``vm.switchover``.

``vm.migrate`` (Cedar ``vm_migrate``) is asked by the destination of a migration an operator ordered, with
fresh evidence as for ``vm.start``; the policy decides on the destination. It runs the VM release's steps
with two differences: the live lease of the migration's source is expected (any other holder is still a
suspected clone), and the lease granted is ``incoming``, never live. The permit also claims the migration
(two destinations racing: one claims it, the other is refused) and issues the destination's migration
certificate over the CSR it sent (:mod:`keysteward.crypto.x509migration`).

``vm.switchover`` is asked by the source at ``pre-switchover`` with its lease's token: in one transaction
the destination's lease becomes active, the source's ends and the migration is switched. No policy question:
the policy decided on the destination at ``vm.migrate``; the source only lets go.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Subject
from keysteward.access.request import AccessRequest, Delivery
from keysteward.access.vm_actions import VmReleased, VmReleaseInputs, VmStart, _VmRelease
from keysteward.crypto import x509migration
from keysteward.crypto.x509ca import IssuedCert
from keysteward.errors import Denied, KeystewardError, NotFound
from keysteward.keys.ca import CertificateAuthorities
from keysteward.keys.keystore import KeyStore
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.store import PolicyStore
from keysteward.release import leases, vm_migrations
from keysteward.release.nonces import Nonces
from keysteward.release.platform import PlatformVerifier
from keysteward.release.registry import Registry
from keysteward.release.vms import Vms
from keysteward.settings import ReleaseSettings


@dataclass(frozen=True, repr=False)
class VmMigrateInputs(VmReleaseInputs):
    migration_id: str = ""
    csr_pem: bytes = b""


@dataclass
class _Migrating(_VmRelease):
    migration: Any = None
    source_lease: str | None = None
    certificate: IssuedCert | None = None


@dataclass(frozen=True, repr=False)
class MigrateReleased(VmReleased):
    migration_id: str = ""
    certificate_pem: str = ""
    ca_pem: str = ""
    source_dn: str = ""
    hostname: str = ""
    source: str = ""
    expires_at: datetime | None = None


class VmMigrate(VmStart):
    """``vm.migrate`` (Cedar ``vm_migrate``): the VM's keys to an attested destination, under an incoming lease."""

    action, cedar_action = "vm.migrate", "vm_migrate"
    lease_state = leases.INCOMING

    def __init__(self, *args: Any, cas: CertificateAuthorities) -> None:
        super().__init__(*args)
        self.cas = cas

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        subject = super().resolve(request, tenant_id, now)
        state: _VmRelease = subject.state
        subject.state = _Migrating(**{f.name: getattr(state, f.name) for f in fields(_VmRelease)})
        subject.details["migration"] = request.inputs.migration_id[:64]
        return subject

    def check(self, conn: Connection, subject: Subject, decision: PolicyDecision) -> None:
        state: _Migrating = subject.state
        inputs: VmMigrateInputs = state.inputs  # type: ignore[assignment]
        assert state.vm is not None and inputs.host is not None
        now = datetime.now(UTC)
        row = vm_migrations.expected(conn, subject.tenant_id, inputs.migration_id, state.vm.id, inputs.host, now)
        live = leases.live_holder(conn, state.vm.id, now)
        if live is None or live.holder != f"host:{row.source}":
            raise Denied(f"the VM no longer runs on {row.source}, the migration's source", code="source_not_running")
        state.migration, state.source_lease = row, live.id
        subject.details["source"] = row.source
        super().check(conn, subject, decision)

    def may_hold(self, subject: Subject, live: leases.LeaseInfo) -> bool:
        return bool(live.id == subject.state.source_lease)

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        if decision.effect == "approval":
            raise Denied("a migration is not held for approval", code="approval_unsupported")
        state: _Migrating = subject.state
        inputs: VmMigrateInputs = state.inputs  # type: ignore[assignment]
        assert state.source_lease is not None and inputs.host is not None
        booked = super().book(conn, subject, decision, now)
        vm_migrations.claim(conn, inputs.migration_id, state.source_lease, state.lease_id, now)
        state.certificate = self.cas.issue_migration(
            conn, subject.tenant_id, inputs.host, inputs.migration_id, "destination", inputs.csr_pem,
            vm_migrations.MIGRATION_MINUTES,
        )  # fmt: skip
        subject.details.update(lease_state=leases.INCOMING, certificate=state.certificate.serial)
        return booked

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> MigrateReleased:
        state: _Migrating = subject.state
        released = super().deliver(subject, booked, performed)
        assert state.certificate is not None
        migration_id = state.migration.id
        ca_pem, _ = self.cas.certificate(subject.tenant_id)
        values = {f.name: getattr(released, f.name) for f in fields(VmReleased)}
        return MigrateReleased(
            **values, migration_id=migration_id, certificate_pem=state.certificate.cert_pem, ca_pem=ca_pem,
            source_dn=x509migration.migration_dn(migration_id, "source"),
            hostname=x509migration.migration_hostname(migration_id), source=state.migration.source,
            expires_at=state.certificate.not_after,
        )  # fmt: skip


@dataclass(frozen=True, repr=False)
class SwitchoverInputs:
    vm_id: str
    host: str
    migration_id: str
    lease_id: str
    token: bytes = field(repr=False)


class VmSwitchover(ActionHandler):
    """``vm.switchover``: the source's lease ends and the destination's becomes active, in one transaction."""

    action, cedar_action, delivery = "vm.switchover", None, Delivery.NOTHING

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def unknown_tenant(self) -> KeystewardError:
        return NotFound("no such lease, or not this token", code="lease_not_found")

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        inputs: SwitchoverInputs = request.inputs
        details = {"migration": inputs.migration_id[:64], "source": inputs.host, "source_lease": inputs.lease_id[:64]}
        return Subject(tenant_id, f"host:{inputs.host}", f"vm:{inputs.vm_id}", None, details=details, state=inputs)

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        inputs: SwitchoverInputs = subject.state
        lease = leases.load(conn, inputs.lease_id, inputs.token)
        if lease.volume_id != inputs.vm_id or lease.holder != f"host:{inputs.host}":
            raise Denied("this host holds no lease of the VM", code="no_live_lease")
        again = vm_migrations.switched_already(conn, subject.tenant_id, inputs.migration_id, inputs.host, lease.id)
        if again is not None:  # the answer was lost on the way: the same answer, nothing moves twice
            return Booked(value={"switched": True, "destination": again.destination, "lease": again.incoming_lease_id},
                          quiet=True)  # fmt: skip
        row = vm_migrations.for_source(conn, subject.tenant_id, inputs.migration_id, inputs.vm_id, inputs.host, lease)
        vm = self.registry.get(subject.tenant_id, inputs.vm_id, conn)
        vm_migrations.switch(conn, row, now, vm.lease_seconds)
        subject.details.update(
            destination=row.destination,
            lease_moves={row.source_lease_id: leases.ENDED, row.incoming_lease_id: leases.ACTIVE},
        )
        return Booked(value={"switched": True, "destination": row.destination, "lease": row.incoming_lease_id})


@dataclass(frozen=True, repr=False)
class ReadyInputs:
    vm_id: str
    host: str
    migration_id: str
    address: str


class VmMigrationReady(ActionHandler):
    """The destination listens: the migration is ready and its source gets a ``migrate-out`` order."""

    action, cedar_action, delivery = "vm.migration_ready", None, Delivery.NOTHING

    def __init__(self, vms: Vms) -> None:
        self.vms = vms

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        inputs: ReadyInputs = request.inputs
        details = {"migration": inputs.migration_id[:64], "address": inputs.address}
        return Subject(tenant_id, f"host:{inputs.host}", f"vm:{inputs.vm_id}", None, details=details, state=inputs)

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        inputs: ReadyInputs = subject.state
        row = vm_migrations.ready(conn, subject.tenant_id, inputs.migration_id, inputs.host, inputs.address, now)
        if row.vm_id != inputs.vm_id:
            raise Denied("that migration is of another VM", code="not_the_destination")
        vm = self.vms.get(subject.tenant_id, row.vm_id, conn)
        order_id = self.vms.order(conn, subject.tenant_id, vm, row.source, "migrate-out", f"host:{inputs.host}", now,
                                  migration_id=inputs.migration_id)  # fmt: skip
        subject.details["source_order"] = order_id
        return Booked(value={"source_order": order_id})


@dataclass(frozen=True, repr=False)
class SourceInputs:
    vm_id: str
    host: str
    migration_id: str
    lease_id: str
    token: bytes = field(repr=False)
    csr_pem: bytes = b""


@dataclass(frozen=True)
class SourceCredentials:
    certificate_pem: str
    ca_pem: str
    address: str
    hostname: str
    destination: str


class VmMigrationSource(ActionHandler):
    """The source, by its live lease's token, gets its migration certificate and where to send the VM."""

    action, cedar_action, delivery = "vm.migration_source", None, Delivery.NOTHING

    def __init__(self, cas: CertificateAuthorities) -> None:
        self.cas = cas

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        inputs: SourceInputs = request.inputs
        details = {"migration": inputs.migration_id[:64], "source_lease": inputs.lease_id[:64]}
        return Subject(tenant_id, f"host:{inputs.host}", f"vm:{inputs.vm_id}", None, details=details, state=inputs)

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        inputs: SourceInputs = subject.state
        lease = leases.load(conn, inputs.lease_id, inputs.token)
        if lease.state != leases.ACTIVE or leases.aware(lease.expires_at) <= now:
            raise Denied("this host holds no live lease of the VM", code="no_live_lease")
        row = vm_migrations.for_source(conn, subject.tenant_id, inputs.migration_id, inputs.vm_id, inputs.host, lease)
        issued = self.cas.issue_migration(conn, subject.tenant_id, inputs.host, inputs.migration_id, "source",
                                          inputs.csr_pem, vm_migrations.MIGRATION_MINUTES)  # fmt: skip
        ca_pem, _ = self.cas.certificate(subject.tenant_id)
        subject.details.update(destination=row.destination, certificate=issued.serial)
        return Booked(value=SourceCredentials(issued.cert_pem, ca_pem, str(row.address),
                                              x509migration.migration_hostname(row.id), row.destination))  # fmt: skip


def register(
    table: ActionTable, registry: Registry, vms: Vms, keys: KeyStore, nonces: Nonces, platform: PlatformVerifier,
    policies: PolicyStore, settings: ReleaseSettings, cas: CertificateAuthorities,
) -> None:  # fmt: skip
    table.register(VmMigrate(registry, vms, keys, nonces, platform, policies, settings, cas=cas))
    table.register(VmSwitchover(registry))
    table.register(VmMigrationReady(vms))
    table.register(VmMigrationSource(cas))
