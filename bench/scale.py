"""Scale on one database: release latency and renewal cost at 1,000 and at 100,000 volumes.

    python bench/scale.py [--quick] [--postgres] [--small N] [--large N] [--rounds N]

Starts a real ``keysteward`` server (dev seal, TLS, one worker; SQLite by default, ``--postgres`` a
throw-away local PostgreSQL 15 cluster), makes the tenant ``acme`` with the key ``volumes`` and a devcloud
provider, and 20 measured volumes, each with its own devcloud instance (through the API). Then it fills
the database directly through the store layer (``keysteward.store``, one transaction per 5,000 rows, the
server running): 199 more tenants with a key each, volumes spread over all 200 tenants until there are
``--small`` (1,000) in all, and a live lease (expiring in a day) on every second one. It measures, then
fills up to ``--large`` (100,000 volumes, 50,000 live leases) and measures again, on the same server;
one unmeasured round first warms connections and caches.

A measurement: ``--rounds`` (10) rounds in which each measured instance releases its own volume (the
challenge and the evidence are made before the clock starts: only ``POST /v1/release`` is timed, one at a
time), then 25 rounds in which each of the 20 leases is renewed (``POST /v1/leases/{id}/renew``, timed one
at a time) while the server's CPU time is counted. On PostgreSQL the filled tables are ANALYZEd first,
as autovacuum would; SQLite is left as a server leaves it.

Figures, each at the large size with the small size's value as reference (ratio = growth, target at most
1.5, i.e. flat): ``release_p50_ms``, ``release_p99_ms``, ``release_cpu_ms`` (CPU per release of the server
and, on PostgreSQL, of the database's processes, from /proc, 10 ms ticks summed over all releases),
``renew_p50_ms``, ``renew_cpu_ms`` (the same per renewal).
The latencies follow whatever else the machine runs; the CPU figures much less, so read a latency growth
with its CPU growth beside it. The client and the server share this machine's cores. The last line is
``{"bench": "scale", "figures": [...]}`` (DESIGN.md section 7). ``--quick``: 1,000 vs 10,000 volumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import (
    BenchError,
    Cleanup,
    children,
    engine_server,
    figure,
    make_temp_dir,
    process_cpu_seconds,
    run_bench,
    say,
)
from _release import ACCOUNT, PROVIDER, TENANT, World, b64, bulk_instances, open_released, release_body
from sqlalchemy import func, select, text

from keysteward.devcloud.provider import Instance
from keysteward.settings import load
from keysteward.store.db import Database
from keysteward.store.models import Key, Lease, Tenant, Volume

BENCH = "scale"
TENANTS = 200
MEASURED = 20
RENEW_ROUNDS = 25
CHUNK = 5000
GROWTH_TARGET = 1.5


@dataclass
class Measured:
    instance: Instance
    volume_id: str
    lease_id: str = ""
    token: bytes = b""


class Filler:
    """Rows written straight into the server's database through the store layer (no API, no crypto)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.now = datetime.now(UTC)
        self.volumes = 0
        self.tenants: list[tuple[str, str]] = []  # (tenant id, key id)

    def tenants_and_keys(self) -> None:
        with self.db.write() as conn:
            acme = conn.execute(select(Tenant.id).where(Tenant.name == TENANT)).scalar_one()
            key = conn.execute(select(Key.id).where(Key.tenant_id == acme)).scalar_one()
            self.tenants.append((acme, key))
            made: list[dict[str, Any]] = []
            keys: list[dict[str, Any]] = []
            for i in range(TENANTS - 1):
                tenant, key_id = str(uuid.uuid4()), str(uuid.uuid4())
                made.append({"id": tenant, "name": f"filler-{i}", "created_at": self.now})
                keys.append(
                    {
                        "id": key_id,
                        "tenant_id": tenant,
                        "name": "volumes",
                        "description": "",
                        "state": "active",
                        "primary_version": 1,
                        "created_at": self.now,
                        "updated_at": self.now,
                    }
                )
                self.tenants.append((tenant, key_id))
            conn.execute(Tenant.__table__.insert(), made)
            conn.execute(Key.__table__.insert(), keys)

    def count(self) -> int:
        with self.db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(Volume)).scalar_one())

    def volumes_up_to(self, total: int) -> None:
        """Volumes over the 200 tenants until ``total`` exist, a live lease on every second one."""
        missing = total - self.count()
        binding = json.dumps({"provider": PROVIDER, "account": ACCOUNT})
        while missing > 0:
            volumes: list[dict[str, Any]] = []
            leases: list[dict[str, Any]] = []
            for _ in range(min(CHUNK, missing)):
                n = self.volumes
                self.volumes += 1
                tenant, key = self.tenants[n % len(self.tenants)]
                volume = str(uuid.uuid4())
                volumes.append(
                    {
                        "id": volume,
                        "tenant_id": tenant,
                        "name": f"filler-{n}",
                        "key_id": key,
                        "dek_id": str(uuid.uuid4()),
                        "labels": "{}",
                        "binding": binding,
                        "state": "active",
                        "lease_seconds": 30,
                        "renew_seconds": 10,
                        "grace_seconds": None,
                        "created_at": self.now,
                        "changed_at": self.now,
                    }
                )
                if n % 2 == 0:
                    leases.append(
                        {
                            "id": str(uuid.uuid4()),
                            "tenant_id": tenant,
                            "volume_id": volume,
                            "holder": f"i-filler{n:08x}",
                            "token_hash": uuid.uuid4().bytes * 2,
                            "state": "active",
                            "created_at": self.now,
                            "renewed_at": self.now,
                            "expires_at": self.now + timedelta(days=1),
                            "ended_at": None,
                            "facts": None,
                        }
                    )
            with self.db.write() as conn:
                conn.execute(Volume.__table__.insert(), volumes)
                if leases:
                    conn.execute(Lease.__table__.insert(), leases)
            missing -= len(volumes)
        if not self.db.is_sqlite:
            with self.db.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE volumes, leases"))

    def live_leases(self) -> int:
        with self.db.read() as conn:
            live = select(func.count()).select_from(Lease).where(Lease.state == "active")
            return int(conn.execute(live).scalar_one())


def _ms(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return 1000.0 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(world: World, measured: list[Measured], rounds: int, server_pids: list[int]) -> dict[str, float]:
    releases: list[float] = []
    release_cpu = 0.0
    for _ in range(rounds):
        for m in measured:
            body, otk = release_body(world.cloud, m.instance, m.volume_id, world.challenge())
            cpu0 = process_cpu_seconds(server_pids)
            started = time.perf_counter()
            r = world.public.client.post("/v1/release", json=body)
            releases.append(time.perf_counter() - started)
            release_cpu += process_cpu_seconds(server_pids) - cpu0
            if r.status_code != 200:
                raise BenchError(f"a release answered {r.status_code}: {r.text[:300]}")
            _secret, m.lease_id, m.token = open_released(r.json(), otk, m.volume_id)
    renewals: list[float] = []
    cpu0 = process_cpu_seconds(server_pids)
    for _ in range(RENEW_ROUNDS):
        for m in measured:
            started = time.perf_counter()
            r = world.public.client.post(f"/v1/leases/{m.lease_id}/renew", json={"token": b64(m.token)})
            renewals.append(time.perf_counter() - started)
            if r.status_code != 200 or r.json().get("action") != "continue":
                raise BenchError(f"a renewal answered {r.status_code}: {r.text[:300]}")
    cpu = process_cpu_seconds(server_pids) - cpu0
    return {
        "release_p50_ms": _ms(releases, 0.5),
        "release_p99_ms": _ms(releases, 0.99),
        "release_cpu_ms": 1000.0 * release_cpu / len(releases),
        "renew_p50_ms": _ms(renewals, 0.5),
        "renew_cpu_ms": 1000.0 * cpu / len(renewals),
    }


def run(args: argparse.Namespace, cleanup: Cleanup) -> list[dict[str, Any]]:
    engine = "postgresql" if args.postgres else "sqlite"
    server, pg = engine_server(cleanup, engine, workers=1)
    world = World.make(server, make_temp_dir(cleanup, "ks-bench-scale-") / "devcloud")
    cleanup.push("close API clients", world.close)
    instances = bulk_instances(world.cloud, MEASURED)
    measured = [Measured(inst, world.create_volume(f"measured-{i}")[0]) for i, inst in enumerate(instances)]
    settings = load(Path(server.data_dir), env={})
    db = Database(settings.database_url, pool_size=2)
    cleanup.push("close the filler's database", db.dispose)
    filler = Filler(db)
    filler.tenants_and_keys()
    assert server.proc is not None
    server_pids = [server.proc.pid, *children(server.proc.pid)]
    if pg is not None:  # PostgreSQL's work for a request is in its backend process, not in the server's
        server_pids += pg.pids()

    measure(world, measured, 1, server_pids)  # warm-up (connections, caches, the policy): not counted
    results: dict[int, dict[str, float]] = {}
    for size in (args.small, args.large):
        started = time.monotonic()
        filler.volumes_up_to(size)
        say(
            f"[{engine}] {filler.count():,} volumes, {filler.live_leases():,} live leases, {TENANTS} tenants "
            f"(filled in {time.monotonic() - started:.1f} s)"
        )
        results[size] = measure(world, measured, args.rounds, server_pids)
        say(f"[{engine}] at {size:,} volumes: " + ", ".join(f"{k} {v:.2f}" for k, v in results[size].items()))
    small, large = results[args.small], results[args.large]
    return [
        figure(
            name, large[name], "ms", small[name], target=round(GROWTH_TARGET * small[name], 3), higher_is_better=False
        )
        for name in large
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 vs 10,000 volumes, 5 rounds (under 60 s)")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL 15 instead of SQLite")
    parser.add_argument("--small", type=int, default=1000, help="volumes at the reference size (default 1,000)")
    parser.add_argument("--large", type=int, default=None, help="volumes at the large size (default 100,000)")
    parser.add_argument("--rounds", type=int, default=None, help="release rounds per size (default 10)")
    args = parser.parse_args(argv)
    if args.large is None:
        args.large = 10_000 if args.quick else 100_000
    if args.rounds is None:
        args.rounds = 5 if args.quick else 10
    if not MEASURED < args.small < args.large or args.rounds < 1:
        parser.error(f"need {MEASURED} < --small < --large and --rounds at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def work(cleanup: Cleanup) -> list[dict[str, Any]]:
        say(f"{BENCH}: {args.small:,} vs {args.large:,} volumes, {TENANTS} tenants, leases on half of them")
        return run(args, cleanup)

    return run_bench(BENCH, work, (20, 4))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
