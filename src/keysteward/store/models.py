"""SQLAlchemy 2 models: the schema of the key manager's database (SQLite or PostgreSQL).

Key material appears here only in wrapped form (``wrapped`` columns): KEK versions under the
root key, DEKs under their KEK version, the tenant CA key and the audit signing key under the
root key, and the root key under the seal. API token secrets are stored as SHA-256 hashes.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Cluster(Base):
    """One row: the sealed root key and what is needed to unseal it."""

    __tablename__ = "cluster"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[str] = mapped_column(String(16))
    seal_type: Mapped[str] = mapped_column(String(16))
    seal_params: Mapped[str] = mapped_column(Text, default="{}")
    sealed_root: Mapped[bytes] = mapped_column(LargeBinary)
    audit_public_key: Mapped[bytes] = mapped_column(LargeBinary)
    audit_private_wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Person(Base):
    """A human of a tenant. API tokens belong to a person; approvals count people, not tokens.

    ``created_by`` is the person (name) whose admin token created this one, or None (the tenant's first
    admin, made by a system admin or at init)."""

    __tablename__ = "people"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_person_name"),)


class ApiToken(Base):
    """A person's API token with one role. ``created_by`` is the person whose admin token minted it (None for
    a tenant's first admin): that admin saw the secret and, for a while, counts as a party to its votes."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(24), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    person_id: Mapped[str] = mapped_column(ForeignKey("people.id"), index=True)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """None: the token lives until it is revoked (``token create --ttl`` sets it)."""
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_token_name"),)


class Key(Base):
    """A tenant key encryption key (KEK): a name with versions."""

    __tablename__ = "keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16))
    primary_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_key_name"),)


class KeyVersion(Base):
    __tablename__ = "key_versions"
    key_id: Mapped[str] = mapped_column(ForeignKey("keys.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DataKey(Base):
    """A data key (DEK) created and held by the server, stored wrapped under a KEK version."""

    __tablename__ = "data_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("keys.id"))
    name: Mapped[str] = mapped_column(String(128))
    kek_version: Mapped[int] = mapped_column(Integer)
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        UniqueConstraint("key_id", "name", name="uq_data_key_name"),
        Index("ix_data_keys_key_version", "key_id", "kek_version"),
    )


class RotationJob(Base):
    """Rewrap of a key's DEKs to a new version: resumable, leased to one server at a time."""

    __tablename__ = "rotation_jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("keys.id"), index=True)
    target_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    rewrapped: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class TenantCA(Base):
    __tablename__ = "tenant_cas"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    key_wrapped: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IssuedCert(Base):
    __tablename__ = "issued_certs"
    serial: Mapped[str] = mapped_column(String(48), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(32))
    not_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_issued_certs_identity", "tenant_id", "role", "name"),)


class CertRevocation(Base):
    """A revoked machine certificate: every server refuses it on every listener (``ca revoke``)."""

    __tablename__ = "cert_revocations"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    serial: Mapped[str] = mapped_column(String(48), primary_key=True)
    role: Mapped[str | None] = mapped_column(String(32), nullable=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    not_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """None for a serial keysteward did not issue (a customer's CA): kept for good."""
    reason: Mapped[str] = mapped_column(Text, default="")
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PreviousCA(Base):
    """A tenant CA a ``ca rotate`` replaced: still trusted (no longer issuing) until ``ca rotate --retire``,
    then kept with ``retired_at`` so that listeners outside the database (the NBD proxy) learn to refuse it."""

    __tablename__ = "tenant_ca_previous"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    rotated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditHead(Base):
    __tablename__ = "audit_heads"
    tenant_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class AuditRecord(Base):
    """One link of a tenant's hash chain; see :mod:`keysteward.audit.chain`."""

    __tablename__ = "audit_records"
    tenant_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    body: Mapped[str] = mapped_column(Text)
    hash: Mapped[str] = mapped_column(String(64))
    signature: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class Provider(Base):
    """A cloud (or the devcloud) whose signed instance identity documents a tenant trusts."""

    __tablename__ = "providers"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    certificates_pem: Mapped[str] = mapped_column(Text)
    audience: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_provider_name"),)


class Volume(Base):
    """A LUKS2 volume bound to the key manager: its keyslot secret is the stored data key ``dek_id``."""

    __tablename__ = "volumes"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str] = mapped_column(ForeignKey("keys.id"))
    dek_id: Mapped[str] = mapped_column(String(36))
    labels: Mapped[str] = mapped_column(Text, default="{}")
    binding: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(8), default="volume", server_default="volume")
    """``volume``; ``vm``: the key of a VM (:mod:`keysteward.store.vm_models`); ``vm-disk``: a VM's volume,
    released only with its VM."""
    lease_seconds: Mapped[int] = mapped_column(Integer)
    renew_seconds: Mapped[int] = mapped_column(Integer)
    grace_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_volume_name"),)


class Lease(Base):
    """Who holds a volume's key until when; ``token_hash`` is the SHA-256 of the renewal token."""

    __tablename__ = "leases"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id"))
    holder: Mapped[str] = mapped_column(String(256))
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    renewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    facts: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The policy request (JSON) the lease was granted on; renewals ask the policy again with it."""
    __table_args__ = (Index("ix_leases_volume_state", "volume_id", "state"),)


class RevokedInstance(Base):
    __tablename__ = "revoked_instances"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256), primary_key=True)
    shred: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UsedNonce(Base):
    """A release nonce already presented (single use); rows go once the nonce has expired."""

    __tablename__ = "used_nonces"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class PolicySet(Base):
    """One version of a tenant's Cedar policy set; the highest version is the one in force."""

    __tablename__ = "policy_sets"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    sources: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApprovalRequest(Base):
    """A release the policy holds for approval by people: pending until a quorum approves, one denies,
    or it expires; an approved one is used by the requester's next release (or stands for a while)."""

    __tablename__ = "approval_requests"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    volume_id: Mapped[str] = mapped_column(String(36))
    holder: Mapped[str] = mapped_column(String(256))
    on_behalf_of: Mapped[str | None] = mapped_column(String(128), nullable=True)  # claimed by the instance
    requested_by: Mapped[str | None] = mapped_column(String(64), nullable=True)  # a proven person (their token)
    groups: Mapped[str] = mapped_column(Text)
    valid_for_seconds: Mapped[int] = mapped_column(Integer)
    policy_version: Mapped[int] = mapped_column(Integer)
    policies: Mapped[str] = mapped_column(Text, default="[]")
    facts: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    grant_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (Index("ix_approval_requests_holder", "tenant_id", "volume_id", "holder"),)


class ApprovalVote(Base):
    """One person's vote: ``approver`` is the token's principal, ``person`` and ``role`` what it counts as,
    ``granted_by`` (JSON list) the people who minted the voter an approving token within the cooling-off
    period. Votes from before people existed have no ``person``."""

    __tablename__ = "approval_votes"
    request_id: Mapped[str] = mapped_column(ForeignKey("approval_requests.id"), primary_key=True)
    approver: Mapped[str] = mapped_column(String(256), primary_key=True)
    decision: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    person: Mapped[str | None] = mapped_column(String(64), nullable=True)
    role: Mapped[str | None] = mapped_column(String(32), nullable=True)
    granted_by: Mapped[str] = mapped_column(Text, default="[]")
    __table_args__ = (Index("uq_approval_vote_person", "request_id", "person", unique=True),)


class TpmKey(Base):
    """An instance's enrolled TPM attestation key (AK): proven to sit in the TPM of a trusted EK by
    MakeCredential/ActivateCredential, or pinned by an admin."""

    __tablename__ = "tpm_keys"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256), primary_key=True)
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    ak_name: Mapped[str] = mapped_column(String(132))
    ek_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PlatformReport(Base):
    """A machine's latest verified TPM quote (a hypervisor's ``keysteward host report-tpm``): its platform facts
    (``context.platform``, JSON) as the quote proved them, for the actions that carry no evidence (KMIP)."""

    __tablename__ = "platform_reports"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256), primary_key=True)
    facts: Mapped[str] = mapped_column(Text)
    ak_name: Mapped[str] = mapped_column(String(132))
    verified_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TpmEnrollment(Base):
    """A MakeCredential challenge in flight: the AK is enrolled when the TPM returns the secret."""

    __tablename__ = "tpm_enrollments"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    holder: Mapped[str] = mapped_column(String(256))
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    ek_digest: Mapped[str] = mapped_column(String(64))
    secret_digest: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


from keysteward.store import frontend_models as frontend_models  # noqa: E402  (XKS and KMIP tables)
from keysteward.store import vm_models as vm_models  # noqa: E402  (the VM tables, on the same metadata)
