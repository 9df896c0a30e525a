"""Enrolling an instance's TPM attestation key (AK), so that its quotes can count in release decisions.

Two ways, both audited:

- **Credential activation.** The instance proves who it is with its identity evidence, bound to a
  challenge nonce and its AK (``sha256(nonce || AK public area)``), and sends its EK (with the EK
  certificate, which must chain to a manufacturer root in ``[release] tpm_ek_roots``). The key manager
  checks the AK is a restricted, TPM-resident signing key and answers a MakeCredential blob for a random
  secret: only the TPM holding that EK, with that AK loaded, can recover it (ActivateCredential). The
  instance sends the secret back and the AK is enrolled for it.
- **Pinning.** An admin who knows the AK (from a provisioning record) pins it for an instance.

An instance with an enrolled AK cannot enroll another one: a swapped AK needs an admin to remove the old.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, delete, insert, select

from keysteward.attest.binding import binding
from keysteward.attest.errors import EVIDENCE_INVALID, EvidenceRejected
from keysteward.attest.identity import InstanceIdentity, verify_identity
from keysteward.attest.tpm import ak_name, check_ak, make_credential, verify_ek_certificate
from keysteward.audit.log import AuditLog
from keysteward.errors import BadRequest, Conflict, Denied, NotFound
from keysteward.identity.principal import Principal, check_name
from keysteward.release.nonces import Nonces, decode
from keysteward.release.platform import PlatformVerifier, load_pem_certificates
from keysteward.release.registry import Registry
from keysteward.release.volumes import HostIdentity, actor_of
from keysteward.settings import ReleaseSettings
from keysteward.store.models import TpmEnrollment, TpmKey

log = logging.getLogger("keysteward.attest.tpm")
CHALLENGE_SECONDS: Final = 300
SECRET_SIZE: Final = 32


class TpmEnrollments:
    def __init__(
        self,
        registry: Registry,
        audit: AuditLog,
        nonces: Nonces,
        platform: PlatformVerifier,
        settings: ReleaseSettings,
    ) -> None:
        self.registry = registry
        self.audit = audit
        self.nonces = nonces
        self.platform = platform
        self.settings = settings
        certificates = load_pem_certificates(settings.tpm_ek_roots, "[release] tpm_ek_roots")
        # manufacturer roots are self-signed; the CAs under them that sign EK certificates come in the same file
        self.roots = tuple(c for c in certificates if c.issuer == c.subject)
        self.intermediates = tuple(c for c in certificates if c.issuer != c.subject)

    def start(
        self,
        tenant_id: str,
        nonce: str,
        identity: Mapping[str, Any],
        ek_public: bytes,
        ek_certificate: bytes | None,
        ak_public: bytes,
        host: str | None = None,
        role: str = "host",
    ) -> tuple[str, bytes]:
        """Check the instance (or the ``host``, of ``role`` host or hypervisor, its mTLS certificate proved), its EK
        and its AK; return the enrollment id and the credential blob."""
        now = datetime.now(UTC)
        raw = decode(nonce)
        expires = self.nonces.check(raw)
        try:
            check_ak(ak_public)
            who: InstanceIdentity | HostIdentity
            if host is not None:
                if identity:
                    raise EvidenceRejected("a host proves itself by its certificate: send no identity document")
                who = HostIdentity("", host)
            else:
                who = self._identity(tenant_id, identity, binding(raw, ak_public), now)
            if not self.roots:
                raise EvidenceRejected(
                    "no TPM manufacturer roots are configured ([release] tpm_ek_roots): an admin must pin the AK"
                )
            if ek_certificate is None:
                raise EvidenceRejected("send the EK certificate (the TPM's NV index 0x01c00002)")
            verify_ek_certificate(ek_certificate, ek_public, self.roots, now, intermediates=self.intermediates)
            secret = os.urandom(SECRET_SIZE)
            credential = make_credential(ek_public, ak_name(ak_public), secret)
        except EvidenceRejected as exc:
            raise Denied(exc.message, code=exc.code) from None
        enrollment_id = str(uuid.uuid4())
        holder = f"{role}:{host}" if host is not None else who.key()

        def effect(conn: Connection) -> dict[str, Any]:
            self.nonces.spend(conn, raw, expires)
            existing = self._enrolled(conn, tenant_id, holder)
            if existing is not None and existing.ak_public != ak_public:
                raise Conflict(
                    f"instance {holder} already has an enrolled AK: an admin must remove it first",
                    code="tpm_already_enrolled",
                )
            conn.execute(
                insert(TpmEnrollment).values(
                    id=enrollment_id,
                    tenant_id=tenant_id,
                    holder=holder,
                    ak_public=ak_public,
                    ek_digest=hashlib.sha256(ek_public).hexdigest(),
                    secret_digest=hashlib.sha256(secret).hexdigest(),
                    expires_at=now + timedelta(seconds=CHALLENGE_SECONDS),
                )
            )
            return {
                "actor": actor_of(holder),
                "action": "tpm.enroll.start",
                "target": actor_of(holder),
                "details": {"enrollment": enrollment_id, "ak_name": ak_name(ak_public).hex()},
            }

        self.audit.commit(tenant_id, effect)
        return enrollment_id, credential

    def _identity(self, tenant_id: str, identity: Mapping[str, Any], bound: bytes, now: datetime) -> InstanceIdentity:
        """The instance, proven by its identity evidence. Evidence that proves nothing gets one message,
        whatever the tenant trusts (or whether the tenant exists: unknown ones come as NO_TENANT_ID), so a
        forged document cannot tell a tenant with that kind of provider from one without, or from none."""
        try:
            return verify_identity(
                identity, self.registry.trusts(tenant_id), binding=bound, now=now, audience=self.settings.audience
            )
        except EvidenceRejected as exc:
            if exc.code != EVIDENCE_INVALID:
                raise
            log.info("TPM enrollment: identity evidence refused: %s", exc.message[:200])
            raise EvidenceRejected(
                "the identity evidence does not prove an instance of a provider this tenant trusts"
            ) from None

    @staticmethod
    def _enrolled(conn: Connection, tenant_id: str, holder: str) -> Any:
        return conn.execute(select(TpmKey).where(TpmKey.tenant_id == tenant_id, TpmKey.holder == holder)).one_or_none()

    def finish(self, tenant_id: str, enrollment_id: str, secret: bytes) -> str:
        """The TPM recovered the secret: enroll the AK; returns the instance (holder)."""
        try:
            uuid.UUID(enrollment_id)
        except ValueError:
            raise NotFound("no such enrollment", code="tpm_enrollment_not_found") from None
        done: dict[str, str] = {}

        def effect(conn: Connection) -> dict[str, Any]:
            row = conn.execute(
                select(TpmEnrollment).where(TpmEnrollment.id == enrollment_id, TpmEnrollment.tenant_id == tenant_id)
            ).one_or_none()
            if row is None:
                raise NotFound("no such enrollment", code="tpm_enrollment_not_found")
            conn.execute(delete(TpmEnrollment).where(TpmEnrollment.id == enrollment_id))
            expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
            if expires <= datetime.now(UTC):
                done["error"] = "tpm_enrollment_expired"
            elif not hmac.compare_digest(hashlib.sha256(secret).hexdigest(), row.secret_digest):
                done["error"] = "tpm_credential_mismatch"
            else:
                conn.execute(delete(TpmKey).where(TpmKey.tenant_id == tenant_id, TpmKey.holder == row.holder))
                conn.execute(
                    insert(TpmKey).values(
                        tenant_id=tenant_id,
                        holder=row.holder,
                        ak_public=row.ak_public,
                        ak_name=ak_name(row.ak_public).hex(),
                        ek_digest=row.ek_digest,
                        method="credential",
                        created_at=datetime.now(UTC),
                    )
                )
            done["holder"] = row.holder
            return {
                "actor": actor_of(row.holder),
                "action": "tpm.enroll",
                "target": actor_of(row.holder),
                "outcome": "denied" if "error" in done else "ok",
                "reason": done.get("error", ""),
                "details": {"enrollment": enrollment_id, "ek_digest": row.ek_digest},
            }

        self.audit.commit(tenant_id, effect)
        if "error" in done:
            raise Denied(
                "the TPM did not recover the credential (another TPM, another AK, or too late)", code=done["error"]
            )
        self.platform.forget(tenant_id, done["holder"])
        return done["holder"]

    def pin(self, actor: Principal, holder: str, ak_public: bytes) -> None:
        """An admin pins ``ak_public`` for the instance ``holder`` (provider/account/instance_id)."""
        if holder.startswith(("host:", "hypervisor:")):
            check_name("host", holder.split(":", 1)[1])
        elif holder.count("/") != 2 or not 0 < len(holder) <= 256:
            raise BadRequest(
                "an instance is named provider/account/instance_id (a host: host:NAME, a hypervisor: hypervisor:NAME)",
                code="bad_instance",
            )
        try:
            check_ak(ak_public)
        except EvidenceRejected as exc:
            raise BadRequest(exc.message, code="tpm_ak_invalid") from None

        def effect(conn: Connection) -> dict[str, Any]:
            conn.execute(delete(TpmKey).where(TpmKey.tenant_id == actor.tenant_id, TpmKey.holder == holder))
            conn.execute(
                insert(TpmKey).values(
                    tenant_id=actor.tenant_id,
                    holder=holder,
                    ak_public=ak_public,
                    ak_name=ak_name(ak_public).hex(),
                    ek_digest=None,
                    method="pinned",
                    created_at=datetime.now(UTC),
                )
            )
            return {
                "actor": actor.describe(),
                "action": "tpm.pin",
                "target": actor_of(holder),
                "details": {"ak_name": ak_name(ak_public).hex()},
            }

        self.audit.commit(actor.tenant_id, effect)
        self.platform.forget(actor.tenant_id, holder)

    def remove(self, actor: Principal, holder: str) -> None:
        def effect(conn: Connection) -> dict[str, Any]:
            gone = conn.execute(
                delete(TpmKey).where(TpmKey.tenant_id == actor.tenant_id, TpmKey.holder == holder)
            ).rowcount
            if not gone:
                raise NotFound(f"no AK is enrolled for {holder[:256]}", code="tpm_key_not_found")
            return {"actor": actor.describe(), "action": "tpm.remove", "target": actor_of(holder)}

        self.audit.commit(actor.tenant_id, effect)
        self.platform.forget(actor.tenant_id, holder)

    def listing(self, tenant_id: str) -> list[dict[str, Any]]:
        with self.registry.db.read() as conn:
            rows = conn.execute(select(TpmKey).where(TpmKey.tenant_id == tenant_id).order_by(TpmKey.holder)).all()
            return [
                {"holder": r.holder, "ak_name": r.ak_name, "method": r.method, "created_at": r.created_at} for r in rows
            ]
