"""Revoked machine certificates: what ``ca revoke SERIAL|ROLE:NAME`` and ``instance revoke host:NAME`` write,
and what every server reads before it accepts a client certificate.

Revocations live in the database (``cert_revocations``), so every server that shares it sees them; each
server trusts what it read for at most :data:`keysteward.keys.ca.SEEN_TTL_SECONDS` (one second). A revocation
is by serial within the tenant; revoking a machine by name revokes every unexpired certificate the tenant CA
issued to that name (the CA records each one in ``issued_certs``). Certificates a customer's own CA issued
outside keysteward are revoked by serial.

The functions here run inside the caller's transaction (``conn``); the caller writes the audit record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, insert, or_, select

from keysteward.errors import BadRequest
from keysteward.identity.principal import MACHINE_ROLES, NAME_RE, check_name
from keysteward.store.models import CertRevocation, IssuedCert

SERIAL_RE = re.compile(r"^[0-9a-f]{1,40}$")
MAX_REASON = 500


@dataclass(frozen=True)
class RevokeTarget:
    """Either one serial, or every certificate of one machine identity (``role:name``)."""

    serial: str | None = None
    role: str | None = None
    name: str | None = None

    def describe(self) -> str:
        return f"cert:{self.serial}" if self.serial else f"{self.role}:{self.name}"


def parse_target(text: str) -> RevokeTarget:
    """``SERIAL`` (hex, as ``ca issue`` prints it; colons and a 0x prefix are accepted) or ``ROLE:NAME``
    (``host:proxy-1``, ``agent:web-1``: the spelling of ``instance revoke host:NAME``)."""
    if not isinstance(text, str) or not 0 < len(text) <= 200:
        raise BadRequest("name a certificate by its serial or a machine as ROLE:NAME", code="bad_revoke_target")
    role, sep, name = text.partition(":")
    if sep and role in MACHINE_ROLES:
        return RevokeTarget(role=role, name=check_name("identity", name))
    serial = text.lower().removeprefix("0x").replace(":", "")
    if not SERIAL_RE.match(serial):
        raise BadRequest(
            f"not a certificate serial (hex) nor ROLE:NAME with ROLE one of {', '.join(MACHINE_ROLES)}",
            code="bad_revoke_target",
        )
    return RevokeTarget(serial=serial.lstrip("0") or "0")


def is_revoked(conn: Connection, tenant_id: str, serial: str) -> bool:
    row = conn.execute(
        select(CertRevocation.serial).where(CertRevocation.tenant_id == tenant_id, CertRevocation.serial == serial)
    ).first()
    return row is not None


def _already(conn: Connection, tenant_id: str, serials: list[str]) -> set[str]:
    if not serials:
        return set()
    rows = conn.execute(
        select(CertRevocation.serial).where(CertRevocation.tenant_id == tenant_id, CertRevocation.serial.in_(serials))
    )
    return {serial for (serial,) in rows}


def revoke(conn: Connection, tenant_id: str, target: RevokeTarget, reason: str) -> list[str]:
    """Record the revocation; the serials newly revoked (an unknown serial is revoked all the same)."""
    now = datetime.now(UTC)
    query = select(IssuedCert.serial, IssuedCert.role, IssuedCert.name, IssuedCert.not_after).where(
        IssuedCert.tenant_id == tenant_id
    )
    if target.serial is not None:
        query = query.where(IssuedCert.serial == target.serial)
    else:
        query = query.where(IssuedCert.role == target.role, IssuedCert.name == target.name, IssuedCert.not_after > now)
    found = {row.serial: row for row in conn.execute(query)}
    if target.serial is not None and target.serial not in found:
        rows: list[dict[str, object]] = [{"serial": target.serial, "role": None, "name": None, "not_after": None}]
    else:
        rows = [{"serial": r.serial, "role": r.role, "name": r.name, "not_after": r.not_after} for r in found.values()]
    done = _already(conn, tenant_id, [str(r["serial"]) for r in rows])
    fresh = [r for r in rows if r["serial"] not in done]
    for row in fresh:
        conn.execute(
            insert(CertRevocation).values(tenant_id=tenant_id, reason=reason[:MAX_REASON], revoked_at=now, **row)
        )
    return sorted(str(r["serial"]) for r in fresh)


def revoke_host_certs(conn: Connection, tenant_id: str, name: str, reason: str) -> list[str]:
    """``instance revoke host:NAME``: every unexpired certificate of that host (none for an instance id)."""
    if NAME_RE.match(name) is None:
        return []
    return revoke(conn, tenant_id, RevokeTarget(role="host", name=name), reason)


def revoked_serials(conn: Connection, tenant_id: str) -> list[str]:
    """The tenant's revoked serials that could still be presented (not yet expired, or of unknown expiry)."""
    now = datetime.now(UTC)
    rows = conn.execute(
        select(CertRevocation.serial).where(
            CertRevocation.tenant_id == tenant_id,
            or_(CertRevocation.not_after.is_(None), CertRevocation.not_after > now),
        )
    )
    return sorted(serial for (serial,) in rows)
