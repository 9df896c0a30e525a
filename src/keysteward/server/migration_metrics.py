"""Prometheus metrics of live migrations (docs/hosts.md, Migration), read from the store at each scrape.

Counted from the ``vm_migrations`` rows rather than in the process: the numbers are the same whichever
worker answers ``/metrics`` and survive a restart. No label names a tenant, VM or host::

    keysteward_vm_migrations_total{outcome}              switched, failed
    keysteward_vm_migrations_open                        requested, incoming or ready now
    keysteward_vm_migration_failures_total{stage}        the state a failed one was in: requested (refused
                                                         or never taken), incoming, ready (the state moving)
    keysteward_vm_migration_downtime_seconds             histogram of QEMU's downtime the sources reported
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from keysteward.release import vm_migrations
from keysteward.store.db import Database
from keysteward.store.vm_models import VmMigration

DOWNTIME_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds: the issue's budget is tens of milliseconds over plain QEMU's (300 ms downtime-limit)."""


class MigrationMetrics(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        with self.db.read() as conn:
            states = dict(conn.execute(select(VmMigration.state, func.count()).group_by(VmMigration.state)).all())
            stages = conn.execute(
                select(VmMigration.failed_in, func.count())
                .where(VmMigration.state == vm_migrations.FAILED)
                .group_by(VmMigration.failed_in)
            ).all()
            downtimes = conn.execute(
                select(VmMigration.downtime_ms).where(VmMigration.downtime_ms.is_not(None))
            ).scalars()
            seconds = [ms / 1000 for ms in downtimes if ms is not None]
        outcomes = CounterMetricFamily("keysteward_vm_migrations", "Live migrations ended, by outcome",
                                       labels=["outcome"])  # fmt: skip
        for outcome in (vm_migrations.SWITCHED, vm_migrations.FAILED):
            outcomes.add_metric([outcome], states.get(outcome, 0))
        yield outcomes
        yield GaugeMetricFamily("keysteward_vm_migrations_open", "Live migrations under way",
                                value=sum(states.get(s, 0) for s in vm_migrations.OPEN))  # fmt: skip
        failures = CounterMetricFamily(
            "keysteward_vm_migration_failures", "Failed live migrations, by the state they failed in", labels=["stage"]
        )
        counted = {str(stage or "unknown"): n for stage, n in stages}
        for stage in (*vm_migrations.OPEN, *(s for s in counted if s not in vm_migrations.OPEN)):
            failures.add_metric([stage], counted.get(stage, 0))
        yield failures
        buckets = [(str(le), sum(1 for s in seconds if s <= le)) for le in DOWNTIME_BUCKETS]
        buckets.append(("+Inf", len(seconds)))
        yield HistogramMetricFamily("keysteward_vm_migration_downtime_seconds",
                                    "Downtime of live migrations as their source's QEMU reported it",
                                    buckets=buckets, sum_value=sum(seconds))  # fmt: skip
