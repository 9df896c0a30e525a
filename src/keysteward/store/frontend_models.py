"""The tables of the front-ends that keep state of their own: AWS XKS stores, their credentials and external
keys (docs/xks.md), and KMIP managed objects (docs/kmip.md). Same metadata as :mod:`keysteward.store.models`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, LargeBinary, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from keysteward.store.models import Base


class XksStore(Base):
    """An AWS KMS external key store: one URI path prefix of the XKS listener, owned by one tenant."""

    __tablename__ = "xks_stores"
    prefix: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    region: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class XksCredential(Base):
    """A SigV4 credential of a store; the secret access key only wrapped under the root key."""

    __tablename__ = "xks_credentials"
    access_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    prefix: Mapped[str] = mapped_column(ForeignKey("xks_stores.prefix"), index=True)
    secret_wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class XksKey(Base):
    """An external key id of a store, naming the tenant key whose versions do its AES-GCM."""

    __tablename__ = "xks_keys"
    prefix: Mapped[str] = mapped_column(ForeignKey("xks_stores.prefix"), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("keys.id"), unique=True)
    usage: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class KmipObject(Base):
    """A KMIP managed object (docs/kmip.md): its attributes, and its material as a data key (``data_keys``)
    wrapped under the tenant's KMIP KEK, so KEK rotation rewraps it and Destroy crypto-shreds it."""

    __tablename__ = "kmip_objects"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    """The KMIP Unique Identifier."""
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    object_type: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(24))
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    """The first Name attribute's value, for Locate by name."""
    data_key_id: Mapped[str | None] = mapped_column(ForeignKey("data_keys.id"), nullable=True)
    attributes: Mapped[str] = mapped_column(Text)
    """JSON: attribute name -> list of TTLV-encoded AttributeValue items (hex), the client-set ones."""
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_get_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (
        Index("ix_kmip_objects_tenant_state", "tenant_id", "state"),
        Index("ix_kmip_objects_tenant_name", "tenant_id", "name"),
    )


_ACTIVE_PIN = text("removed_at IS NULL")


class KmipClientPin(Base):
    """A hypervisor's self-signed certificate a tenant admin registered (KMIP trust mode C, docs/kmip.md): the
    listener accepts exactly this certificate (its SHA-256 fingerprint) as the machine ``hypervisor/name``.
    A removed pin keeps its row (``removed_at``), so a later handshake with it is refused in its tenant's name."""

    __tablename__ = "kmip_client_pins"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    """SHA-256 of the certificate's DER, lower-case hex."""
    cert_pem: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(String(255))
    not_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (
        Index("ux_kmip_client_pins_active_fingerprint", "fingerprint", unique=True, sqlite_where=_ACTIVE_PIN,
              postgresql_where=_ACTIVE_PIN),
        Index("ux_kmip_client_pins_active_name", "tenant_id", "name", unique=True, sqlite_where=_ACTIVE_PIN,
              postgresql_where=_ACTIVE_PIN),
    )  # fmt: skip
