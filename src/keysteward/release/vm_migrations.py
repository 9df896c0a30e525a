"""Live migrations of VMs between hosts (docs/hosts.md, Migration), inside the caller's transaction.

A migration is asked by an operator (an order ``migrate`` to the destination; the order's id is the
migration's) and moves through ``requested`` (ordered), ``incoming`` (the destination passed ``vm.migrate``
and holds an incoming lease), ``ready`` (its QEMU listens; the source got its ``migrate-out`` order) and
``switched`` (the leases moved). Anything else ends it ``failed`` (``failed_in`` keeps the state it was in):
the incoming lease is cancelled, the source's lease was never touched. While the state moves, the source
reports its progress (:func:`record_progress`; ``vm migrate`` shows it, ``/metrics`` counts the downtime).
A VM has at most one open migration; an open one older than :data:`MIGRATION_MINUTES` (its certificates'
lifetime) is failed when the next is asked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, insert, select, update

from keysteward.errors import Conflict, Denied
from keysteward.release import leases
from keysteward.store.vm_models import VmMigration

MIGRATION_MINUTES: Final = 10
REQUESTED, INCOMING, READY, SWITCHED, FAILED = "requested", "incoming", "ready", "switched", "failed"
OPEN: Final = (REQUESTED, INCOMING, READY)


def _row(conn: Connection, tenant_id: str, migration_id: str) -> Any:
    row = conn.execute(
        select(VmMigration.__table__).where(VmMigration.id == migration_id, VmMigration.tenant_id == tenant_id)
    ).first()
    if row is None:
        raise Denied("no such migration", code="migration_not_found")
    return row


def _set(conn: Connection, migration_id: str, was: str, now: datetime, **values: Any) -> bool:
    done = conn.execute(
        update(VmMigration)
        .where(VmMigration.id == migration_id, VmMigration.state == was)
        .values(updated_at=now, **values)
    )
    return done.rowcount == 1


def stale(row: Any, now: datetime) -> bool:
    return leases.aware(row.created_at) + timedelta(minutes=MIGRATION_MINUTES) <= now


def request(
    conn: Connection, tenant_id: str, vm_id: str, source: str, destination: str, migration_id: str, now: datetime
) -> None:
    """Record a migration ordered by an operator; a VM with an open one refuses a second."""
    open_rows = conn.execute(
        select(VmMigration.__table__).where(VmMigration.vm_id == vm_id, VmMigration.state.in_(OPEN))
    ).all()
    for row in open_rows:
        if not stale(row, now):
            raise Conflict(f"the VM is being migrated to {row.destination} already", code="migration_in_progress")
        fail(conn, tenant_id, row.id, now)
    conn.execute(
        insert(VmMigration).values(
            id=migration_id, tenant_id=tenant_id, vm_id=vm_id, source=source, destination=destination,
            state=REQUESTED, created_at=now, updated_at=now,
        )
    )  # fmt: skip


def expected(conn: Connection, tenant_id: str, migration_id: str, vm_id: str, host: str, now: datetime) -> Any:
    """The migration ``host`` asks ``vm.migrate`` for: requested, of this VM, to this host, not stale."""
    row = _row(conn, tenant_id, migration_id)
    if row.vm_id != vm_id or row.destination != host:
        raise Denied("this host is not the destination of that migration", code="not_the_destination")
    if row.state != REQUESTED or stale(row, now):
        raise Denied(f"the migration is {row.state}, not waiting for its destination", code="migration_taken")
    return row


def claim(conn: Connection, migration_id: str, source_lease: str, incoming_lease: str, now: datetime) -> None:
    """The destination's ``vm.migrate`` was permitted: its lease is incoming (exactly one destination wins)."""
    if not _set(conn, migration_id, REQUESTED, now, state=INCOMING, source_lease_id=source_lease,
                incoming_lease_id=incoming_lease):  # fmt: skip
        raise Denied("another request took this migration", code="migration_taken")


def ready(conn: Connection, tenant_id: str, migration_id: str, host: str, address: str, now: datetime) -> Any:
    """The destination listens at ``address``; the caller orders the source to send."""
    row = _row(conn, tenant_id, migration_id)
    if row.destination != host:
        raise Denied("this host is not the destination of that migration", code="not_the_destination")
    if not _set(conn, migration_id, INCOMING, now, state=READY, address=address):
        raise Denied(f"the migration is {row.state}, not incoming", code="migration_not_incoming")
    return _row(conn, tenant_id, migration_id)


def for_source(conn: Connection, tenant_id: str, migration_id: str, vm_id: str, host: str, lease: Any) -> Any:
    """The migration as its source may act on it: ready, and ``lease`` is the one it is to give up."""
    row = _row(conn, tenant_id, migration_id)
    if row.vm_id != vm_id or row.source != host or row.source_lease_id != lease.id:
        raise Denied("this host is not the source of that migration", code="not_the_source")
    if row.state != READY:
        raise Denied(f"the migration is {row.state}, not ready", code="migration_not_ready")
    return row


def switched_already(conn: Connection, tenant_id: str, migration_id: str, host: str, lease_id: str) -> Any:
    """The migration if this source's switchover was done before (asked again after a lost answer)."""
    row = _row(conn, tenant_id, migration_id)
    done = row.state == SWITCHED and row.source == host and row.source_lease_id == lease_id
    return row if done else None


def switch(conn: Connection, row: Any, now: datetime, lease_seconds: int) -> None:
    """Switchover: the destination's lease active, the source's ended, the migration switched; all or none."""
    if not leases.switch_over(conn, row.incoming_lease_id, row.source_lease_id, now, lease_seconds):
        raise Denied("a lease of the migration is no longer what it was", code="switchover_refused")
    if not _set(conn, row.id, READY, now, state=SWITCHED):
        raise Denied("the migration is no longer ready", code="switchover_refused")


def fail(conn: Connection, tenant_id: str, migration_id: str, now: datetime) -> bool:
    """A migration that ends before switchover: failed, its incoming lease cancelled. False if switched."""
    row = conn.execute(
        select(VmMigration.__table__).where(VmMigration.id == migration_id, VmMigration.tenant_id == tenant_id)
    ).first()
    if row is None or row.state not in OPEN:
        return False
    if row.incoming_lease_id is not None:
        leases.cancel_incoming(conn, row.incoming_lease_id, now)
    return _set(conn, migration_id, row.state, now, state=FAILED, failed_in=row.state)


def record_progress(
    conn: Connection, tenant_id: str, migration_id: str, vm_id: str, host: str, progress: Mapping[str, Any],
    now: datetime,
) -> None:  # fmt: skip
    """The source's report (checked by the route's schema): kept while the migration is ready or switched;
    the first report carrying ``downtime_ms`` sets the migration's downtime."""
    row = _row(conn, tenant_id, migration_id)
    if row.vm_id != vm_id or row.source != host:
        raise Denied("this host is not the source of that migration", code="not_the_source")
    if row.state not in (READY, SWITCHED):
        raise Denied(f"the migration is {row.state}: no progress to report", code="migration_not_ready")
    values: dict[str, Any] = {"progress": json.dumps(dict(progress), sort_keys=True)}
    downtime = progress.get("downtime_ms")
    if isinstance(downtime, int) and row.downtime_ms is None:
        values["downtime_ms"] = downtime
    _set(conn, migration_id, row.state, now, **values)


def open_for_vm(conn: Connection, tenant_id: str, vm_id: str) -> Any:
    """The VM's open migration (requested, incoming or ready), or None."""
    return conn.execute(
        select(VmMigration.__table__).where(
            VmMigration.tenant_id == tenant_id, VmMigration.vm_id == vm_id, VmMigration.state.in_(OPEN)
        )
    ).first()


def state_for_host(conn: Connection, tenant_id: str, migration_id: str, host: str) -> str:
    """The migration's state, for its source or destination host only (another host learns nothing)."""
    row = _row(conn, tenant_id, migration_id)
    if row is None or host not in (row.source, row.destination):
        raise Denied("no such migration of this host", code="migration_not_found")
    return str(row.state)
