"""Tenant certificate authorities: machines (agents, hosts) authenticate with certificates they issue.

A tenant either lets keysteward make its CA (``ca init``: the CA key is stored wrapped under the
root key) or brings its own (``ca import``: with its key, keysteward can issue; without, the
customer issues and keysteward only verifies).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import insert, select

from keysteward.audit.log import AuditLog
from keysteward.crypto import x509ca, x509identity
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import BadRequest, Conflict, NotFound, Unauthenticated
from keysteward.identity.principal import MACHINE_ROLES, Principal, check_name
from keysteward.keys.root import RootOfTrust
from keysteward.store.db import Database
from keysteward.store.models import IssuedCert, Tenant, TenantCA
from keysteward.ttlcache import TtlCache

MAX_PEM = 64 * 1024
SEEN_TTL_SECONDS = 1.0  # a certificate verified this recently is not verified again


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

    def issue(
        self, actor: Principal, name: str, role: str, *, csr_pem: bytes | None = None, days: int = 365
    ) -> x509ca.IssuedCert:
        check_name("identity", name)
        if role not in MACHINE_ROLES:
            raise BadRequest(
                f"certificates are for machines: role must be one of {', '.join(MACHINE_ROLES)}",
                code="bad_role",
            )
        if not 1 <= days <= 825:
            raise BadRequest("days must be between 1 and 825", code="bad_days")
        if csr_pem is None:
            raise BadRequest(
                "send a certificate signing request: the machine makes its own key pair, and the server never"
                " holds a machine's private key ('keysteward ca issue' does this for you)",
                code="csr_required",
            )
        cert_pem, wrapped = self.certificate(actor.tenant_id)
        if wrapped is None:
            raise Conflict(
                "this tenant's CA was imported without its key: issue certificates with your own CA",
                code="ca_key_absent",
            )
        key_pem = self.root.root().open(wrapped, ca_key_aad(actor.tenant_id))
        try:
            issued = x509ca.issue_client_cert(
                cert_pem, key_pem, tenant=actor.tenant, role=role, name=name, csr_pem=csr_pem, days=days
            )
        finally:
            wipe_bytearray(key_pem)
        with self.db.write() as conn:
            conn.execute(
                insert(IssuedCert).values(
                    serial=issued.serial,
                    tenant_id=actor.tenant_id,
                    name=name,
                    role=role,
                    not_after=issued.not_after,
                    created_at=datetime.now(UTC),
                )
            )
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="ca.issue",
                target=f"{role}:{name}",
                details={"serial": issued.serial, "days": days, "csr": csr_pem is not None},
            )
        return issued

    def trusted_pems(self) -> list[str]:
        with self.db.read() as conn:
            return [pem for (pem,) in conn.execute(select(TenantCA.cert_pem))]

    def seen(self, cert_der: bytes) -> Principal | None:
        """The principal of a certificate verified within the last second, without a database read."""
        return self._seen.get(hashlib.sha256(cert_der).digest())

    def authenticate(self, cert_der: bytes) -> Principal:
        """The machine principal of a client certificate verified against its own tenant's CA."""
        seen = self.seen(cert_der)
        if seen is not None:
            return seen
        claimed = x509identity.peek_identity(cert_der)
        with self.db.read() as conn:
            row = conn.execute(
                select(Tenant.id, TenantCA.cert_pem)
                .join(TenantCA, TenantCA.tenant_id == Tenant.id)
                .where(Tenant.name == claimed.tenant)
            ).first()
        if row is None:
            raise Unauthenticated("the client certificate names a tenant without a CA", code="bad_client_cert")
        identity = x509identity.verify_client_cert(cert_der, row.cert_pem)
        if identity.role not in MACHINE_ROLES:
            raise Unauthenticated("the client certificate carries no machine role", code="bad_client_cert")
        principal = Principal(
            tenant_id=row.id, tenant=identity.tenant, role=identity.role, name=identity.name, kind="cert"
        )
        self._seen.put(hashlib.sha256(cert_der).digest(), principal)
        return principal
