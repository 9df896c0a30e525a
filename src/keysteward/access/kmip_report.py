"""What ``keysteward kmip status|clients|objects`` shows: KMIP objects and clients of a tenant, no material.

Stale keys: vCenter never deletes keys, so keys no client fetched for N days pile up; the object list says
which VM each was for (its ``x-Name``/``x-Identifier``/``x-Component``) and when it was last fetched.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select

from keysteward.access.kmip_attributes import Attributes
from keysteward.store.db import Database
from keysteward.store.frontend_models import KmipClientPin, KmipObject
from keysteward.store.models import CertRevocation, IssuedCert

MAX_LISTED = 10_000


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


class KmipReport:
    def __init__(self, db: Database) -> None:
        self.db = db

    def objects(self, tenant_id: str, stale_days: int | None = None) -> list[dict[str, Any]]:
        stmt = select(KmipObject.__table__).where(KmipObject.tenant_id == tenant_id)
        if stale_days is not None:
            cutoff = datetime.now(UTC) - timedelta(days=stale_days)
            never = KmipObject.last_get_at.is_(None) & (KmipObject.created_at < cutoff)
            stmt = stmt.where(or_(KmipObject.last_get_at < cutoff, never))
            stmt = stmt.where(KmipObject.state.not_in(("Destroyed", "DestroyedCompromised")))
        stmt = stmt.order_by(KmipObject.created_at).limit(MAX_LISTED)
        with self.db.read() as conn:
            rows = conn.execute(stmt).all()
        out = []
        for row in rows:
            tags = Attributes.from_json(row.attributes).audited()
            out.append({
                "uid": row.id, "object_type": row.object_type, "state": row.state, "name": row.name,
                "created_by": row.created_by, "created_at": _iso(row.created_at), "last_get_at": _iso(row.last_get_at),
                "vm": tags.get("x-Name"), "x_identifier": tags.get("x-Identifier"),
                "x_component": tags.get("x-Component"),
            })  # fmt: skip
        return out

    def clients(self, tenant_id: str) -> list[dict[str, Any]]:
        """Hypervisor certificates the tenant CA issued, revoked or not, and those pinned (trust mode C, removed
        or not; ``serial`` is then ``sha256:FINGERPRINT``), with the objects each name created."""
        with self.db.read() as conn:
            certs = conn.execute(
                select(IssuedCert.name, IssuedCert.serial, IssuedCert.not_after, CertRevocation.revoked_at)
                .outerjoin(CertRevocation, (CertRevocation.tenant_id == IssuedCert.tenant_id)
                           & (CertRevocation.serial == IssuedCert.serial))
                .where(IssuedCert.tenant_id == tenant_id, IssuedCert.role == "hypervisor")
                .order_by(IssuedCert.name, IssuedCert.created_at)
            ).all()  # fmt: skip
            made = dict(
                conn.execute(
                    select(KmipObject.created_by, func.count())
                    .where(KmipObject.tenant_id == tenant_id)
                    .group_by(KmipObject.created_by)
                ).all()
            )
            pins = conn.execute(
                select(KmipClientPin.name, KmipClientPin.fingerprint, KmipClientPin.not_after, KmipClientPin.removed_at)
                .where(KmipClientPin.tenant_id == tenant_id)
                .order_by(KmipClientPin.name, KmipClientPin.created_at)
            ).all()  # fmt: skip
        issued = [
            {"name": c.name, "serial": c.serial, "not_after": _iso(c.not_after), "revoked": c.revoked_at is not None,
             "objects_created": _made_by(made, c.name), "trust": "issued"}
            for c in certs
        ]  # fmt: skip
        pinned = [
            {"name": p.name, "serial": f"sha256:{p.fingerprint}", "not_after": _iso(p.not_after),
             "revoked": p.removed_at is not None, "objects_created": _made_by(made, p.name), "trust": "pinned"}
            for p in pins
        ]  # fmt: skip
        return issued + pinned

    def status(self, tenant_id: str, listen: str) -> dict[str, Any]:
        with self.db.read() as conn:
            states = dict(
                conn.execute(
                    select(KmipObject.state, func.count())
                    .where(KmipObject.tenant_id == tenant_id)
                    .group_by(KmipObject.state)
                ).all()
            )
        return {"listen": listen, "enabled": bool(listen), "objects": {k: int(v) for k, v in states.items()},
                "total": int(sum(states.values()))}  # fmt: skip


def _made_by(made: dict[str, int], name: str) -> int:
    """Objects whose creator is the hypervisor ``name`` (``cert:TENANT/hypervisor/NAME``)."""
    return int(sum(count for actor, count in made.items() if actor.endswith(f"/hypervisor/{name}")))
