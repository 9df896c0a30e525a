"""Pinned hypervisor certificates (KMIP trust mode C): ``keysteward kmip client add|list|remove``.

A tenant admin registers a hypervisor's self-signed certificate as the machine ``hypervisor/NAME`` of the
tenant. The KMIP listener accepts exactly that certificate (its SHA-256 fingerprint, see
:mod:`keysteward.crypto.x509pin`); a pin is one tenant's only, and a fingerprint is pinned in one tenant at a
time. Adding and removing are audited (``kmip.client_add``, ``kmip.client_remove``). A removed pin keeps its
row, so a handshake with it afterwards is refused and recorded in its tenant's chain.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from keysteward.audit.log import AuditLog
from keysteward.crypto.x509pin import check_pinnable
from keysteward.errors import Conflict, NotFound
from keysteward.identity.principal import Principal, check_name
from keysteward.store.db import Database
from keysteward.store.frontend_models import KmipClientPin
from keysteward.store.models import Tenant

ROLE = "hypervisor"


@dataclass(frozen=True)
class Pin:
    tenant_id: str
    tenant: str
    name: str
    fingerprint: str
    not_after: datetime
    removed: bool


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


class KmipPins:
    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        self.on_new_pin: list[Callable[[str], None]] = []
        """Called with a new pin's PEM once it is stored (the KMIP listener of this process trusts it at once)."""

    def add(self, actor: Principal, name: str, cert_pem: str) -> dict[str, Any]:
        check_name("identity", name)
        now = datetime.now(UTC)
        cert = check_pinnable(cert_pem, now)

        def effect(conn: Connection) -> dict[str, Any]:
            taken = conn.execute(
                select(KmipClientPin.tenant_id, KmipClientPin.name).where(
                    KmipClientPin.removed_at.is_(None),
                    (KmipClientPin.fingerprint == cert.fingerprint)
                    | ((KmipClientPin.tenant_id == actor.tenant_id) & (KmipClientPin.name == name)),
                )
            ).first()
            if taken is not None:
                raise Conflict(
                    "this certificate is pinned already, or a pinned client has this name: remove it first",
                    code="kmip_client_exists",
                )
            conn.execute(
                insert(KmipClientPin).values(
                    id=str(uuid.uuid4()), tenant_id=actor.tenant_id, name=name, fingerprint=cert.fingerprint,
                    cert_pem=cert.pem, subject=cert.subject, not_after=cert.not_after,
                    created_by=actor.describe()[:200], created_at=now,
                )
            )  # fmt: skip
            return {
                "actor": actor.describe(),
                "action": "kmip.client_add",
                "target": f"{ROLE}:{name}",
                "details": {"fingerprint": cert.fingerprint, "subject": cert.subject,
                            "not_after": cert.not_after.isoformat()},
            }  # fmt: skip

        try:
            self.audit.commit(actor.tenant_id, effect)
        except IntegrityError:  # another server pinned it in the same instant
            raise Conflict("this certificate is pinned already", code="kmip_client_exists") from None
        for fn in self.on_new_pin:
            fn(cert.pem)
        return {"name": name, "role": ROLE, "fingerprint": cert.fingerprint, "subject": cert.subject,
                "not_after": cert.not_after.isoformat()}  # fmt: skip

    def remove(self, actor: Principal, name: str) -> dict[str, Any]:
        check_name("identity", name)
        now = datetime.now(UTC)
        done: dict[str, Any] = {}

        def effect(conn: Connection) -> dict[str, Any]:
            row = conn.execute(
                select(KmipClientPin.id, KmipClientPin.fingerprint).where(
                    KmipClientPin.tenant_id == actor.tenant_id, KmipClientPin.name == name,
                    KmipClientPin.removed_at.is_(None),
                )
            ).first()  # fmt: skip
            if row is None:
                raise NotFound(f"no pinned KMIP client named {name}", code="kmip_client_not_found")
            conn.execute(update(KmipClientPin).where(KmipClientPin.id == row.id).values(removed_at=now))
            done.update(name=name, fingerprint=row.fingerprint, removed_at=now.isoformat())
            return {"actor": actor.describe(), "action": "kmip.client_remove", "target": f"{ROLE}:{name}",
                    "details": {"fingerprint": row.fingerprint}}  # fmt: skip

        self.audit.commit(actor.tenant_id, effect)
        return done

    def listing(self, tenant_id: str) -> list[dict[str, Any]]:
        """The tenant's pinned clients in force (removed ones are in the audit log)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(KmipClientPin.__table__)
                .where(KmipClientPin.tenant_id == tenant_id, KmipClientPin.removed_at.is_(None))
                .order_by(KmipClientPin.name)
            ).all()
            return [
                {"name": r.name, "role": ROLE, "fingerprint": r.fingerprint, "subject": r.subject,
                 "not_after": _iso(r.not_after), "created_at": _iso(r.created_at), "created_by": r.created_by}
                for r in rows
            ]  # fmt: skip

    def find(self, fingerprint: str) -> Pin | None:
        """The pin of ``fingerprint``: the one in force, else the latest removed one; None if never pinned."""
        with self.db.read() as conn:
            row = conn.execute(
                select(KmipClientPin.tenant_id, Tenant.name.label("tenant"), KmipClientPin.name,
                       KmipClientPin.not_after, KmipClientPin.removed_at)
                .join(Tenant, Tenant.id == KmipClientPin.tenant_id)
                .where(KmipClientPin.fingerprint == fingerprint)
                .order_by(KmipClientPin.removed_at.is_not(None), KmipClientPin.created_at.desc())
                .limit(1)
            ).first()  # fmt: skip
        if row is None:
            return None
        return Pin(row.tenant_id, row.tenant, row.name, fingerprint, row.not_after, row.removed_at is not None)

    def tenant_of_subject(self, subject: str) -> str | None:
        """The tenant that pinned a certificate with this subject (a look-alike's refusal is recorded there)."""
        with self.db.read() as conn:
            return conn.execute(
                select(KmipClientPin.tenant_id).where(KmipClientPin.subject == subject[:255]).limit(1)
            ).scalar_one_or_none()

    def pems(self) -> list[str]:
        """Every pinned certificate in force: the KMIP listener's extra TLS trust anchors."""
        with self.db.read() as conn:
            return list(
                conn.execute(select(KmipClientPin.cert_pem).where(KmipClientPin.removed_at.is_(None))).scalars()
            )
