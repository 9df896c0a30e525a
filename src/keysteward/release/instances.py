"""The instances and hosts a tenant's keys went to: every lease holder and every revoked one, for
``keysteward instance list``.

An entry is a holder as leases and the audit log name it (``provider/account/instance_id`` or
``host:NAME``) with its live leases, when it last got a key, and whether (and how) it is revoked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, select

from keysteward.release.leases import ACTIVE, aware
from keysteward.store.models import Lease, RevokedInstance

MAX_INSTANCES = 5000


@dataclass(frozen=True)
class InstanceInfo:
    holder: str
    live_leases: int
    last_release_at: datetime | None
    revoked: bool
    shred: bool
    revoked_at: datetime | None
    reason: str


def listing(conn: Connection, tenant_id: str, now: datetime) -> list[InstanceInfo]:
    """Every holder of a lease of the tenant and every revoked instance, by holder name."""
    last = dict(
        conn.execute(
            select(Lease.holder, func.max(Lease.created_at)).where(Lease.tenant_id == tenant_id).group_by(Lease.holder)
        ).all()
    )
    live: dict[str, int] = {}
    for holder, expires in conn.execute(
        select(Lease.holder, Lease.expires_at).where(Lease.tenant_id == tenant_id, Lease.state == ACTIVE)
    ).all():
        if aware(expires) > now:
            live[holder] = live.get(holder, 0) + 1
    revoked = {
        r.holder: r
        for r in conn.execute(select(RevokedInstance.__table__).where(RevokedInstance.tenant_id == tenant_id)).all()
    }
    out = []
    for holder in sorted(set(last) | set(revoked))[:MAX_INSTANCES]:
        r = revoked.get(holder)
        out.append(
            InstanceInfo(
                holder=holder,
                live_leases=live.get(holder, 0),
                last_release_at=aware(last[holder]) if holder in last else None,
                revoked=r is not None,
                shred=bool(r.shred) if r is not None else False,
                revoked_at=aware(r.created_at) if r is not None else None,
                reason=r.reason if r is not None else "",
            )
        )
    return out
