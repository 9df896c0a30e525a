"""Tenant CA rotation without downtime: ``ca rotate`` puts a new CA beside the old, ``ca rotate --retire`` ends it.

1. ``rotate``: a new CA (keysteward makes it; its key wrapped under the root key) becomes the tenant's
   current CA and issues every certificate from now on. The old one moves to ``tenant_ca_previous`` and stays
   trusted: machines with its certificates keep working, and renew (``ca renew``) onto the new CA.
2. ``retire``: the old CA is no longer trusted; its certificates are refused by every server within a second
   (:data:`keysteward.keys.ca.SEEN_TTL_SECONDS`), and by the NBD proxy at its next revocation-list fetch. The
   retired CA stays in the table (``retired_at``) so that the proxy learns which issuer to refuse.

One rotation at a time: a second ``rotate`` before ``retire`` is refused (``ca_rotation_pending``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, insert, select, update

from keysteward.crypto import x509ca
from keysteward.crypto.x509identity import pem_fingerprint
from keysteward.errors import Conflict, NotFound
from keysteward.identity.principal import Principal
from keysteward.store.db import for_update
from keysteward.store.models import PreviousCA, TenantCA

if TYPE_CHECKING:
    from keysteward.keys.ca import CertificateAuthorities


def trusted_previous_pems(conn: Connection, tenant_id: str) -> list[str]:
    """The tenant's replaced CAs that are still trusted (a rotation not yet retired)."""
    rows = conn.execute(
        select(PreviousCA.cert_pem).where(PreviousCA.tenant_id == tenant_id, PreviousCA.retired_at.is_(None))
    )
    return [pem for (pem,) in rows]


def retired_pems(conn: Connection, tenant_id: str) -> list[str]:
    rows = conn.execute(
        select(PreviousCA.cert_pem).where(PreviousCA.tenant_id == tenant_id, PreviousCA.retired_at.is_not(None))
    )
    return [pem for (pem,) in rows]


def all_previous_pems(conn: Connection) -> list[str]:
    """Every tenant's replaced, unretired CAs (TLS trust anchors beside the current ones)."""
    return [pem for (pem,) in conn.execute(select(PreviousCA.cert_pem).where(PreviousCA.retired_at.is_(None)))]


def _ca_name(tenant: str) -> str:
    # a subject of its own: the issuer name of a certificate says which of the tenant's CAs signed it
    return f"keysteward {tenant[:32]} CA {datetime.now(UTC):%Y%m%dT%H%M%S}"


def new_ca(tenant: str) -> tuple[str, bytearray]:
    """The next CA of ``tenant``: (certificate PEM, key PEM for the caller to wrap and wipe)."""
    return x509ca.new_ca(_ca_name(tenant))


def rotate(cas: CertificateAuthorities, actor: Principal, cert_pem: str, wrapped: bytes) -> str:
    """Make ``cert_pem`` (its key ``wrapped`` under the root key) the current CA, the old one previous."""
    now = datetime.now(UTC)
    with cas.db.write() as conn:
        current = conn.execute(
            for_update(select(TenantCA.cert_pem).where(TenantCA.tenant_id == actor.tenant_id), cas.db)
        ).first()
        if current is None:
            raise NotFound("this tenant has no CA: run 'keysteward ca init' or 'ca import'", code="ca_not_found")
        if trusted_previous_pems(conn, actor.tenant_id):
            raise Conflict(
                "a rotation is in progress: retire the previous CA first ('keysteward ca rotate --retire')",
                code="ca_rotation_pending",
            )
        old_fingerprint = pem_fingerprint(current.cert_pem)
        conn.execute(
            insert(PreviousCA).values(
                tenant_id=actor.tenant_id, fingerprint=old_fingerprint, cert_pem=current.cert_pem, rotated_at=now
            )
        )
        conn.execute(
            update(TenantCA)
            .where(TenantCA.tenant_id == actor.tenant_id)
            .values(cert_pem=cert_pem, key_wrapped=wrapped, source="rotate", created_at=now)
        )
        cas.audit.append(
            conn,
            actor.tenant_id,
            actor=actor.describe(),
            action="ca.rotate",
            target=f"tenant:{actor.tenant}",
            details={"previous": old_fingerprint, "current": pem_fingerprint(cert_pem)},
        )
    for fn in cas.on_new_ca:
        fn(cert_pem)
    return cert_pem


def retire(cas: CertificateAuthorities, actor: Principal) -> str:
    with cas.db.write() as conn:
        row = conn.execute(
            for_update(
                select(PreviousCA.fingerprint, PreviousCA.cert_pem).where(
                    PreviousCA.tenant_id == actor.tenant_id, PreviousCA.retired_at.is_(None)
                ),
                cas.db,
            )
        ).first()
        if row is None:
            raise Conflict("no rotation to finish: 'keysteward ca rotate' first", code="ca_no_previous")
        conn.execute(
            update(PreviousCA)
            .where(PreviousCA.tenant_id == actor.tenant_id, PreviousCA.fingerprint == row.fingerprint)
            .values(retired_at=datetime.now(UTC))
        )
        cas.audit.append(
            conn,
            actor.tenant_id,
            actor=actor.describe(),
            action="ca.retire",
            target=f"tenant:{actor.tenant}",
            details={"retired": row.fingerprint},
        )
    return str(row.cert_pem)
