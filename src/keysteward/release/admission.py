"""What a release does in its transaction before it is decided: the nonce spent, the volume's state under a
row lock, the caller's revocation, the volume's live lease, and (for a plain permit) the lease granted.

On PostgreSQL this is one statement, run on the driver's connection (:mod:`keysteward.store.driver`:
SQLAlchemy's execution was 45% of the audit writer thread's Python time in a release run). Each statement
is a round trip made while the batch holds the tenant's chain head, which every other server's releases of
that tenant wait for: the six of a release (spend, volume, revocation, live lease, supersede, insert) were
most of its time under that lock. The statement grants the lease only when every check below would pass
(the same conditions, in SQL), so the caller's checks then find nothing to refuse; when one fails, nothing
is granted and the caller refuses as before. Its reads share one snapshot, taken before its row lock; that
is safe because every writer of a tenant's volumes, leases and revocations takes the tenant's chain head (a
group-commit batch first, an administrative change at its append), so none can commit while this batch
holds the head and waits.

A group-commit batch may send this statement ahead, with its chain-head lock and the statements of the
releases after it, in one round trip (:func:`statement`; see
:meth:`keysteward.audit.batch_effects.lock_heads`): it runs in the same transaction, after the
same lock, in the same order, so it reads what it would have read.

SQLite has no data-modifying ``WITH``: it spends the nonce, then reads the rest in one statement, both on
the driver's connection too (no round trip to save there, but SQLAlchemy's execution cost more than
SQLite's).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, DateTime
from sqlalchemy.exc import NoResultFound

from keysteward.release import leases
from keysteward.release.nonces import Nonces, digest_of, replayed
from keysteward.release.volumes import ACTIVE
from keysteward.store.driver import DriverStatement, Fetch

_UTC = DateTime(timezone=True)
_SQLITE_READ = DriverStatement(
    """
SELECT volumes.state, data_keys.wrapped IS NULL,
    (SELECT shred FROM revoked_instances WHERE tenant_id = :t AND holder = :h),
    leases.id, leases.volume_id, leases.holder, leases.state, leases.created_at, leases.renewed_at, leases.expires_at
FROM volumes JOIN data_keys ON data_keys.id = volumes.dek_id
LEFT JOIN leases ON leases.volume_id = volumes.id AND leases.state = :lease_active
WHERE volumes.id = :vol
ORDER BY leases.expires_at DESC
""",
    columns=(None,) * 7 + (_UTC,) * 3,
)
"""The volume's state, the caller's revocation and the volume's active leases, newest expiry first (the
live one is the first not yet expired), in one statement."""
_IN_ONE_STATEMENT = DriverStatement("""
WITH spent AS (
    INSERT INTO used_nonces (digest, expires_at) VALUES (:nonce_digest, :nonce_expires)
    ON CONFLICT DO NOTHING RETURNING digest
), volume AS (
    SELECT volumes.state, data_keys.wrapped IS NULL AS shredded
    FROM volumes JOIN data_keys ON data_keys.id = volumes.dek_id
    WHERE volumes.id = :vol FOR UPDATE
), found AS (
    SELECT EXISTS (SELECT FROM spent) AS fresh, volume.state, volume.shredded,
        (SELECT shred FROM revoked_instances WHERE tenant_id = :t AND holder = :h) AS revoked,
        live.id AS lease_id, live.volume_id AS lease_volume_id, live.holder AS lease_holder,
        live.state AS lease_state, live.created_at AS lease_created_at, live.renewed_at AS lease_renewed_at,
        live.expires_at AS lease_expires_at
    FROM volume LEFT JOIN LATERAL (
        SELECT id, volume_id, holder, state, created_at, renewed_at, expires_at FROM leases
        WHERE leases.volume_id = :vol AND leases.state = :lease_active AND leases.expires_at > :at
        ORDER BY leases.expires_at DESC LIMIT 1
    ) AS live ON true
), grantable AS (
    SELECT FROM found WHERE :grant AND fresh AND state = :volume_active AND NOT shredded AND revoked IS NULL
        AND (lease_holder IS NULL OR lease_holder = :h)
), superseded AS (
    UPDATE leases SET state = :lease_superseded, ended_at = :at
    WHERE volume_id = :vol AND holder = :h AND state = :lease_active AND EXISTS (SELECT FROM grantable)
), granted AS (
    INSERT INTO leases (id, tenant_id, volume_id, holder, token_hash, state, created_at, renewed_at, expires_at, facts)
    SELECT :new_id, :t, :vol, :h, :new_token_hash, :new_state, :at, :at, :new_expires_at, :new_facts FROM grantable
    RETURNING id
)
SELECT found.*, EXISTS (SELECT FROM granted) AS granted FROM found
""")


@dataclass(frozen=True)
class Admission:
    state: str
    """The volume's state."""
    shredded: bool
    revoked: bool
    """The caller is revoked (``revoked_instances``)."""
    live: leases.LeaseInfo | None
    """The volume's live lease (any holder's), if there is one."""
    granted: leases.LeaseInfo | None = None
    """The lease granted with the checks (PostgreSQL, when asked for one and every check passed)."""


@dataclass(frozen=True)
class NewLease:
    """The lease a plain permit grants, if every check passes."""

    lease_id: str
    token: bytes | bytearray
    seconds: int
    facts: str
    state: str = leases.ACTIVE


def statement(
    *, raw_nonce: bytes, nonce_expires: datetime, volume_id: str, tenant_id: str, holder: str, now: datetime,
    grant: NewLease | None = None,
) -> Fetch:  # fmt: skip
    """PostgreSQL: the one statement :func:`read` runs, for a batch to send ahead (then ``read`` takes its rows)."""
    new = grant or NewLease("", b"", 0, "")
    values: dict[str, Any] = {
        "nonce_digest": digest_of(raw_nonce),
        "nonce_expires": nonce_expires,
        "vol": volume_id,
        "t": tenant_id,
        "h": holder,
        "at": now,
        "grant": grant is not None,
        "volume_active": ACTIVE,
        "lease_active": leases.ACTIVE,
        "lease_superseded": leases.SUPERSEDED,
        "new_id": new.lease_id,
        "new_token_hash": leases.token_hash(new.token),
        "new_state": new.state,
        "new_expires_at": now + timedelta(seconds=new.seconds),
        "new_facts": new.facts,
    }
    return _IN_ONE_STATEMENT, values


def read(
    conn: Connection, *, raw_nonce: bytes, nonce_expires: datetime, volume_id: str, tenant_id: str, holder: str,
    now: datetime, grant: NewLease | None = None, rows: list[Any] | None = None,
) -> Admission:  # fmt: skip
    """Spend the nonce and read the rest in the caller's transaction (a nonce spent before raises
    ``nonce_replayed``); with ``grant``, on PostgreSQL, also grant that lease when every check passes.
    ``rows``: what :func:`statement`, made with the same values, returned in this transaction (run ahead)."""
    if conn.dialect.name != "postgresql":
        Nonces.spend(conn, raw_nonce, nonce_expires)
        rows = _SQLITE_READ.rows(conn, {"vol": volume_id, "t": tenant_id, "h": holder, "lease_active": leases.ACTIVE})
        if not rows:
            raise NoResultFound("the volume is gone")
        state, shredded, revoked = rows[0][:3]
        live = next((_lease(*row[3:]) for row in rows if row[3] is not None and leases.aware(row[9]) > now), None)
        return Admission(state, bool(shredded), revoked is not None, live)
    if rows is None:
        sql, values = statement(
            raw_nonce=raw_nonce, nonce_expires=nonce_expires, volume_id=volume_id, tenant_id=tenant_id,
            holder=holder, now=now, grant=grant,
        )  # fmt: skip
        rows = sql.rows(conn, values)
    if not rows:
        raise NoResultFound("the volume is gone")
    fresh, state, shredded, revoked, *lease, was_granted = rows[0]
    if not fresh:
        raise replayed()
    live = leases.LeaseInfo(*lease) if lease[0] is not None else None
    granted = None
    if was_granted:
        assert grant is not None
        expires = now + timedelta(seconds=grant.seconds)
        granted = leases.LeaseInfo(grant.lease_id, volume_id, holder, grant.state, now, now, expires)
    return Admission(state, bool(shredded), revoked is not None, live, granted)


def _lease(lease_id: str, volume_id: str, holder: str, state: str, *times: datetime) -> leases.LeaseInfo:
    created, renewed, expires = (leases.aware(t) for t in times)
    return leases.LeaseInfo(lease_id, volume_id, holder, state, created, renewed, expires)
