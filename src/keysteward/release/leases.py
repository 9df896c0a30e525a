"""Leases: which instance holds which volume's key until when, inside the caller's transaction.

A lease is *live* while its state is ``active`` and ``expires_at`` is in the future. At most one holder
has a live lease on a volume: a release to another holder while one is live is a suspected clone. The
same holder asking again (an agent restarted, a boot unlock followed by the daemon) supersedes its own
lease. Renewal tokens are stored as SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, DateTime, LargeBinary, Table, bindparam, insert, select, update

from keysteward.errors import NotFound
from keysteward.lru import Lru
from keysteward.store.driver import DriverStatement
from keysteward.store.models import Lease, Tenant

if TYPE_CHECKING:
    from keysteward.store.db import Database

ACTIVE, SUPERSEDED, ENDED, EXPIRED, REVOKED, SHRED = "active", "superseded", "ended", "expired", "revoked", "shred"
INCOMING, CANCELLED = "incoming", "cancelled"
"""A live migration's destination holds an ``incoming`` lease (never live) until the switchover makes it
``active`` and ends the source's in one transaction; a migration that fails first ``cancelled`` it."""


# Statements of the release and renewal paths, built once and given their values at execution: one built
# per call with its values inlined is walked value by value for SQLAlchemy's cache key, which cost more
# than SQLite running it (these run one after another on the audit writer thread).
_LIVE = (
    select(Lease.__table__)
    .where(Lease.volume_id == bindparam("volume_id"), Lease.state == ACTIVE)
    .order_by(Lease.expires_at.desc())
)
_SUPERSEDE = (
    update(Lease)
    .where(Lease.volume_id == bindparam("v"), Lease.holder == bindparam("h"), Lease.state == ACTIVE)
    .values(state=SUPERSEDED, ended_at=bindparam("at"))
)
_GRANTED = (
    "id",
    "tenant_id",
    "volume_id",
    "holder",
    "token_hash",
    "state",
    "created_at",
    "renewed_at",
    "expires_at",
    "facts",
)
_UTC = DateTime(timezone=True)
_SQLITE_SUPERSEDE = DriverStatement(
    "UPDATE leases SET state = :superseded, ended_at = :at WHERE volume_id = :v AND holder = :h AND state = :active",
    {"at": _UTC},
)
_SQLITE_INSERT = DriverStatement(
    "INSERT INTO leases (id, tenant_id, volume_id, holder, token_hash, state, created_at, renewed_at, expires_at,"
    " facts) VALUES (:id, :tenant_id, :volume_id, :holder, :token_hash, :state, :created_at, :renewed_at,"
    " :expires_at, :facts)",
    {"token_hash": LargeBinary(), "created_at": _UTC, "renewed_at": _UTC, "expires_at": _UTC},
)
"""SQLite: :data:`_SUPERSEDE` and the insert of a lease, run on the driver's connection
(:mod:`keysteward.store.driver`)."""
_SUPERSEDE_AND_INSERT = (
    insert(cast(Table, Lease.__table__))
    .values({name: bindparam(f"new_{name}") for name in _GRANTED})
    .add_cte(_SUPERSEDE.cte("superseded"))
)
"""PostgreSQL: :data:`_SUPERSEDE` then the insert in one statement (one round trip fewer while the batch
holds the tenant's chain head; the new row is not among those the UPDATE sees). Its values are named
``new_*``: one named as a column would also be SET by the UPDATE."""
_BY_ID = select(Lease.__table__).where(Lease.id == bindparam("lease"))
# (an UPDATE's bound names must not be its table's column names: SQLAlchemy keeps those for SET)
_EXTEND = (
    update(Lease)
    .where(Lease.id == bindparam("lease"))
    .values(renewed_at=bindparam("at"), expires_at=bindparam("until"))
)
_GRANT = (
    select(Lease.tenant_id, Tenant.name.label("tenant"), Lease.volume_id, Lease.holder, Lease.token_hash, Lease.facts)
    .join(Tenant, Tenant.id == Lease.tenant_id)
    .where(Lease.id == bindparam("lease"))
)
_SET_STATE = update(Lease).where(Lease.id == bindparam("lease")).values(state=bindparam("to"), ended_at=bindparam("at"))


@dataclass(frozen=True)
class LeaseInfo:
    id: str
    volume_id: str
    holder: str
    state: str
    created_at: datetime
    renewed_at: datetime
    expires_at: datetime


@dataclass(frozen=True, repr=False)
class Grant:
    """What a lease was granted with, which never changes: its tenant, volume, holder, token hash and facts.
    Its state and expiry, which do change (a revocation on any server), are read only in the transaction."""

    tenant_id: str
    tenant: str
    volume_id: str
    holder: str
    token_hash: bytes
    facts: str | None

    def opens(self, token: bytes) -> bool:
        return hmac.compare_digest(self.token_hash, token_hash(token))


GRANTS_REMEMBERED = 32768
"""Leases whose grant a server process keeps (about 1 KB each, most of it the policy facts: 35 MB at most):
a fleet's renewals then read nothing before the audit writer's transaction, and need no worker thread on
their way to it."""


class Grants:
    """The grants of the leases this process has seen, by lease id (:class:`Grant` is immutable, so a miss
    only costs a read; nothing here answers whether a lease is still live)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._known: Lru[str, Grant] = Lru(GRANTS_REMEMBERED)

    def cached(self, lease_id: str) -> Grant | None:
        return self._known.get(lease_id)

    def load(self, lease_id: str) -> Grant:
        """The lease's grant, read if not known (NotFound for an unknown lease or an id that is no UUID)."""
        found = self._known.get(lease_id)
        if found is not None:
            return found
        try:
            uuid.UUID(lease_id)
        except ValueError:
            raise NotFound("no such lease, or not this token", code="lease_not_found") from None
        with self.db.read() as conn:
            row = conn.execute(_GRANT, {"lease": lease_id}).first()
        if row is None:
            raise NotFound("no such lease, or not this token", code="lease_not_found")
        found = Grant(str(row.tenant_id), str(row.tenant), str(row.volume_id), row.holder, row.token_hash, row.facts)
        self._known.put(lease_id, found)
        return found


def _info(row: Any) -> LeaseInfo:
    times = aware(row.created_at), aware(row.renewed_at), aware(row.expires_at)
    return LeaseInfo(row.id, row.volume_id, row.holder, row.state, *times)


def token_hash(token: bytes | bytearray) -> bytes:
    return hashlib.sha256(bytes(token)).digest()


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes for aware columns; everything here is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def live_holder(conn: Connection, volume_id: str, now: datetime) -> LeaseInfo | None:
    rows = conn.execute(_LIVE, {"volume_id": volume_id}).all()
    for row in rows:
        if aware(row.expires_at) > now:
            return _info(row)
    return None


def grant(
    conn: Connection,
    *,
    lease_id: str,
    tenant_id: str,
    volume_id: str,
    holder: str,
    token: bytes | bytearray,
    now: datetime,
    seconds: int,
    facts: str | None = None,
    state: str = ACTIVE,
) -> LeaseInfo:
    """A new lease for ``holder``; its own earlier active leases on the volume become superseded."""
    expires = now + timedelta(seconds=seconds)
    row = {
        "id": lease_id,
        "tenant_id": tenant_id,
        "volume_id": volume_id,
        "holder": holder,
        "token_hash": token_hash(token),
        "state": state,
        "created_at": now,
        "renewed_at": now,
        "expires_at": expires,
        "facts": facts,
    }
    supersede = {"v": volume_id, "h": holder, "at": now}
    if conn.dialect.name == "postgresql":
        conn.execute(_SUPERSEDE_AND_INSERT, {**supersede, **{f"new_{name}": value for name, value in row.items()}})
    else:
        _SQLITE_SUPERSEDE.rows(conn, {**supersede, "superseded": SUPERSEDED, "active": ACTIVE})
        _SQLITE_INSERT.rows(conn, row)
    return LeaseInfo(lease_id, volume_id, holder, state, now, now, expires)


def load(conn: Connection, lease_id: str, token: bytes) -> Any:
    """The lease row if ``token`` is its renewal token; an unknown lease and a wrong token look the same."""
    row = conn.execute(_BY_ID, {"lease": lease_id}).first()
    if row is None or not hmac.compare_digest(row.token_hash, token_hash(token)):
        raise NotFound("no such lease, or not this token", code="lease_not_found")
    return row


def set_state(conn: Connection, lease_id: str, state: str, now: datetime) -> None:
    conn.execute(_SET_STATE, {"lease": lease_id, "to": state, "at": now})


def switch_over(conn: Connection, incoming_id: str, source_id: str, now: datetime, seconds: int) -> bool:
    """The incoming lease becomes active and the source's ends, both or neither (False: one had moved on)."""
    ended = conn.execute(
        update(Lease).where(Lease.id == source_id, Lease.state == ACTIVE).values(state=ENDED, ended_at=now)
    )
    if ended.rowcount != 1:
        return False
    expires = now + timedelta(seconds=seconds)
    moved = conn.execute(
        update(Lease)
        .where(Lease.id == incoming_id, Lease.state == INCOMING)
        .values(state=ACTIVE, renewed_at=now, expires_at=expires)
    )
    return moved.rowcount == 1


def cancel_incoming(conn: Connection, lease_id: str, now: datetime) -> bool:
    done = conn.execute(
        update(Lease).where(Lease.id == lease_id, Lease.state == INCOMING).values(state=CANCELLED, ended_at=now)
    )
    return done.rowcount == 1


def extend(conn: Connection, lease_id: str, now: datetime, seconds: int) -> datetime:
    expires = now + timedelta(seconds=seconds)
    conn.execute(_EXTEND, {"lease": lease_id, "at": now, "until": expires})
    return expires


def listing(conn: Connection, tenant_id: str, volume_id: str | None, limit: int = 1000) -> list[LeaseInfo]:
    """Newest first; an active lease past its expiry shows as ``expired`` (it is no longer live)."""
    stmt = select(Lease.__table__).where(Lease.tenant_id == tenant_id)
    if volume_id is not None:
        stmt = stmt.where(Lease.volume_id == volume_id)
    now = datetime.now(UTC)
    found = [_info(r) for r in conn.execute(stmt.order_by(Lease.created_at.desc()).limit(limit)).all()]
    return [
        replace(lease, state=EXPIRED) if lease.state == ACTIVE and aware(lease.expires_at) <= now else lease
        for lease in found
    ]
