"""Tenant certificate authorities: machines (agents, hosts) authenticate with certificates they issue.

A tenant either lets keysteward make its CA (``ca init``: the CA key is stored wrapped under the
root key) or brings its own (``ca import``: with its key, keysteward can issue; without, the
customer issues and keysteward only verifies).

Machine certificates last at most :data:`MAX_CERT_DAYS` (90 days by default) and their holders renew them
(:meth:`CertificateAuthorities.renew`); ``ca revoke`` ends one or all of a machine's certificates on every
server within :data:`SEEN_TTL_SECONDS` (:mod:`keysteward.keys.cert_revocations`); ``ca rotate`` puts a new
CA beside the old one until ``ca rotate --retire`` (:mod:`keysteward.keys.ca_rotation`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Connection, insert, select

from keysteward.audit.log import AuditLog
from keysteward.crypto import x509ca, x509identity, x509migration
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import BadRequest, Conflict, NotFound, Unauthenticated
from keysteward.identity.principal import MACHINE_ROLES, Principal, check_name
from keysteward.keys import ca_rotation, cert_revocations
from keysteward.keys.root import RootOfTrust
from keysteward.store.db import Database
from keysteward.store.models import IssuedCert, Tenant, TenantCA
from keysteward.ttlcache import TtlCache

MAX_PEM = 64 * 1024
SEEN_TTL_SECONDS = 1.0
"""A certificate verified this recently is not verified again: the most a revocation waits on any server."""
DEFAULT_CERT_DAYS = 90
MAX_CERT_DAYS = 90


def ca_key_aad(tenant_id: str) -> bytes:
    return f"keysteward/v1/tenant-ca|{tenant_id}".encode()


class CertificateAuthorities:
    def __init__(self, db: Database, root: RootOfTrust, audit: AuditLog) -> None:
        self.db = db
        self.root = root
        self.audit = audit
        self.on_new_ca: list[Callable[[str], None]] = []
        self._seen: TtlCache[bytes, Principal] = TtlCache(SEEN_TTL_SECONDS)

    def _store(self, actor: Principal, cert_pem: str, key_pem: bytearray | None, source: str) -> None:
        wrapped = self.root.root().seal(key_pem, ca_key_aad(actor.tenant_id)) if key_pem is not None else None
        if key_pem is not None:
            wipe_bytearray(key_pem)
        with self.db.write() as conn:
            if conn.execute(select(TenantCA.tenant_id).where(TenantCA.tenant_id == actor.tenant_id)).first():
                raise Conflict("this tenant has a CA already", code="ca_exists")
            conn.execute(
                insert(TenantCA).values(
                    tenant_id=actor.tenant_id,
                    cert_pem=cert_pem,
                    key_wrapped=wrapped,
                    source=source,
                    created_at=datetime.now(UTC),
                )
            )
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action=f"ca.{source}",
                target=f"tenant:{actor.tenant}",
                details={"can_issue": wrapped is not None},
            )
        for fn in self.on_new_ca:
            fn(cert_pem)

    def init(self, actor: Principal) -> str:
        self.root.root()
        cert_pem, key_pem = x509ca.new_ca(f"keysteward {actor.tenant} CA")
        self._store(actor, cert_pem, key_pem, "init")
        return cert_pem

    def import_(self, actor: Principal, cert_pem: str, key_pem: bytes | None) -> str:
        if len(cert_pem) > MAX_PEM or (key_pem is not None and len(key_pem) > MAX_PEM):
            raise BadRequest("PEM input is larger than 64 KiB", code="bad_pem")
        x509ca.check_ca(cert_pem, key_pem)
        self._store(actor, cert_pem, bytearray(key_pem) if key_pem is not None else None, "import")
        return cert_pem

    def certificate(self, tenant_id: str) -> tuple[str, bytes | None]:
        with self.db.read() as conn:
            row = conn.execute(
                select(TenantCA.cert_pem, TenantCA.key_wrapped).where(TenantCA.tenant_id == tenant_id)
            ).first()
        if row is None:
            raise NotFound("this tenant has no CA: run 'keysteward ca init' or 'ca import'", code="ca_not_found")
        return row.cert_pem, row.key_wrapped

    def previous_pem(self, tenant_id: str) -> str | None:
        """The CA the current rotation replaced (still trusted), or None."""
        with self.db.read() as conn:
            previous = ca_rotation.trusted_previous_pems(conn, tenant_id)
        return previous[0] if previous else None

    def issue(
        self, actor: Principal, name: str, role: str, *, csr_pem: bytes | None = None, days: int = DEFAULT_CERT_DAYS
    ) -> x509ca.IssuedCert:
        check_name("identity", name)
        if role not in MACHINE_ROLES:
            raise BadRequest(
                f"certificates are for machines: role must be one of {', '.join(MACHINE_ROLES)}",
                code="bad_role",
            )
        check_days(days)
        if csr_pem is None:
            raise BadRequest(
                "send a certificate signing request: the machine makes its own key pair, and the server never"
                " holds a machine's private key ('keysteward ca issue' does this for you)",
                code="csr_required",
            )
        return self._sign(actor, actor.tenant_id, actor.tenant, role, name, csr_pem, days, action="ca.issue")

    def _sign(
        self,
        actor: Principal,
        tenant_id: str,
        tenant: str,
        role: str,
        name: str,
        csr_pem: bytes,
        days: int,
        *,
        action: str,
        details: dict[str, object] | None = None,
    ) -> x509ca.IssuedCert:
        """Sign ``csr_pem`` for ``tenant/role/name`` with the tenant's current CA, record it and audit it."""
        cert_pem, wrapped = self.certificate(tenant_id)
        if wrapped is None:
            raise Conflict(
                "this tenant's CA was imported without its key: issue certificates with your own CA",
                code="ca_key_absent",
            )
        key_pem = self.root.root().open(wrapped, ca_key_aad(tenant_id))
        try:
            issued = x509ca.issue_client_cert(
                cert_pem, key_pem, tenant=tenant, role=role, name=name, csr_pem=csr_pem, days=days
            )
        finally:
            wipe_bytearray(key_pem)
        with self.db.write() as conn:
            conn.execute(
                insert(IssuedCert).values(
                    serial=issued.serial,
                    tenant_id=tenant_id,
                    name=name,
                    role=role,
                    not_after=issued.not_after,
                    created_at=datetime.now(UTC),
                )
            )
            self.audit.append(
                conn,
                tenant_id,
                actor=actor.describe(),
                action=action,
                target=f"{role}:{name}",
                details={"serial": issued.serial, "days": days, "not_after": issued.not_after.isoformat(),
                         **(details or {})},
            )  # fmt: skip
        return issued

    def issue_migration(
        self, conn: Connection, tenant_id: str, host: str, migration_id: str, end: x509migration.End, csr_pem: bytes,
        minutes: int,
    ) -> x509ca.IssuedCert:  # fmt: skip
        """One end's certificate of a live migration (:mod:`keysteward.crypto.x509migration`), audited in
        the caller's transaction (the permit or the source's request that it answers)."""
        cert_pem, wrapped = self.certificate(tenant_id)
        if wrapped is None:
            raise Conflict("this tenant's CA was imported without its key: no migration certificates",
                           code="ca_key_absent")  # fmt: skip
        key_pem = self.root.root().open(wrapped, ca_key_aad(tenant_id))
        try:
            issued = x509migration.issue_migration_cert(
                cert_pem, key_pem, migration_id=migration_id, end=end, csr_pem=csr_pem, minutes=minutes
            )
        finally:
            wipe_bytearray(key_pem)
        self.audit.append(
            conn, tenant_id, actor=f"host:{host}", action="vm.migration_certificate",
            target=f"migration:{migration_id}",
            details={"end": end, "serial": issued.serial, "not_after": issued.not_after.isoformat()},
        )  # fmt: skip
        return issued

    def renew(self, cert_der: bytes, csr_pem: bytes, days: int = DEFAULT_CERT_DAYS) -> x509ca.IssuedCert:
        """A new certificate for the identity of ``cert_der``, the holder's current certificate, checked now
        (never from the cache): an expired, revoked or retired-CA certificate does not renew."""
        check_days(days)
        holder = self._verify(cert_der)
        return self._sign(
            holder, holder.tenant_id, holder.tenant, holder.role, holder.name, csr_pem, days,
            action="ca.renew", details={"renewed": holder.serial},
        )  # fmt: skip

    def revoke(self, actor: Principal, target_text: str, reason: str = "") -> list[str]:
        """Revoke one certificate (serial) or all of a machine's (``ROLE:NAME``); the serials revoked now."""
        target = cert_revocations.parse_target(target_text)
        with self.db.write() as conn:
            serials = cert_revocations.revoke(conn, actor.tenant_id, target, reason)
            if not serials and target.serial is None:
                raise NotFound(f"no unexpired certificate of {target.describe()}", code="cert_not_found")
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="ca.revoke",
                target=target.describe(),
                details={"serials": serials, "reason": reason[: cert_revocations.MAX_REASON]},
            )
        self.forget_seen()
        return serials

    def revoke_machine_in(self, conn: Connection, tenant_id: str, role: str, name: str, reason: str) -> list[str]:
        """In the caller's transaction (``instance revoke host:NAME``): revoke the machine's certificates."""
        target = cert_revocations.RevokeTarget(role=role, name=name)
        return cert_revocations.revoke(conn, tenant_id, target, reason)

    def forget_seen(self) -> None:
        """Drop the certificates verified in the last second: the next request of each is checked again."""
        self._seen.clear()

    def rotate(self, actor: Principal) -> str:
        """A new CA beside the current one (which stays trusted, no longer issuing); its certificate."""
        cert_pem, key_pem = ca_rotation.new_ca(actor.tenant)
        try:
            wrapped = self.root.root().seal(key_pem, ca_key_aad(actor.tenant_id))
        finally:
            wipe_bytearray(key_pem)
        return ca_rotation.rotate(self, actor, cert_pem, wrapped)

    def retire(self, actor: Principal) -> str:
        """Retire the CA the last rotation replaced: its certificates are refused from now on."""
        pem = ca_rotation.retire(self, actor)
        self.forget_seen()
        return pem

    def revocation_list(self, tenant_id: str) -> dict[str, list[str]]:
        """What a listener outside this process (the NBD proxy) needs to refuse what servers refuse."""
        with self.db.read() as conn:
            return {
                "revoked_serials": cert_revocations.revoked_serials(conn, tenant_id),
                "retired_cas": ca_rotation.retired_pems(conn, tenant_id),
            }

    def trusted_pems(self) -> list[str]:
        """Every tenant's CAs a client certificate may come from (the TLS listener's trust anchors)."""
        with self.db.read() as conn:
            return [pem for (pem,) in conn.execute(select(TenantCA.cert_pem))] + ca_rotation.all_previous_pems(conn)

    def seen(self, cert_der: bytes) -> Principal | None:
        """The principal of a certificate verified within the last second, without a database read."""
        return self._seen.get(hashlib.sha256(cert_der).digest())

    def authenticate(self, cert_der: bytes) -> Principal:
        """The machine principal of a client certificate verified against its own tenant's CAs, unrevoked."""
        seen = self.seen(cert_der)
        if seen is not None:
            return seen
        principal = self._verify(cert_der)
        self._seen.put(hashlib.sha256(cert_der).digest(), principal)
        return principal

    def _verify(self, cert_der: bytes) -> Principal:
        claimed = x509identity.peek_identity(cert_der)
        with self.db.read() as conn:
            row = conn.execute(
                select(Tenant.id, TenantCA.cert_pem)
                .join(TenantCA, TenantCA.tenant_id == Tenant.id)
                .where(Tenant.name == claimed.tenant)
            ).first()
            if row is None:
                raise Unauthenticated("the client certificate names a tenant without a CA", code="bad_client_cert")
            cas = [row.cert_pem, *ca_rotation.trusted_previous_pems(conn, row.id)]
            revoked = cert_revocations.is_revoked(conn, row.id, claimed.serial)
        identity = _verify_against(cert_der, cas)
        if identity.role not in MACHINE_ROLES:
            raise Unauthenticated("the client certificate carries no machine role", code="bad_client_cert")
        if revoked:
            raise Unauthenticated("the client certificate was revoked", code="cert_revoked")
        return Principal(
            tenant_id=row.id, tenant=identity.tenant, role=identity.role, name=identity.name, kind="cert",
            serial=identity.serial,
        )  # fmt: skip


def check_days(days: int) -> None:
    if not 1 <= days <= MAX_CERT_DAYS:
        raise BadRequest(
            f"days must be between 1 and {MAX_CERT_DAYS}: machines renew their certificates ('ca renew')",
            code="bad_days",
        )


def _verify_against(cert_der: bytes, ca_pems: list[str]) -> x509identity.ClientIdentity:
    """Verified by the first of the tenant's CAs (current first) that issued it; else the current CA's refusal."""
    first: Unauthenticated | None = None
    for pem in ca_pems:
        try:
            return x509identity.verify_client_cert(cert_der, pem)
        except Unauthenticated as exc:
            first = first or exc
    assert first is not None
    raise first
