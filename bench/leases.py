"""Lease renewal at fleet scale: 5,000 simulated agents renewing every 10 s for 2 minutes.

    python bench/leases.py [--quick] [--agents N] [--duration S] [--engine sqlite|postgresql] [--workers N]

Starts a real ``keysteward`` server (dev seal, TLS, one worker per core; SQLite by default, or
PostgreSQL on a throw-away local cluster), creates a tenant, the key ``volumes`` and a devcloud
registered as the tenant's ``aws-iid`` provider, then N instances (one bulk write of the devcloud's
state) and N volumes (``POST /v1/volumes``, lease 30 s, renew every 10 s).

Each simulated agent releases its own volume once (challenge, evidence made by the devcloud for its
instance, release, the sealed answer opened for the lease token), then renews its lease
(``POST /v1/leases/{id}/renew``) every 10 s. Agent i renews in its own slot, i/N of the 10 s period,
so renewals are spread evenly at N/10 per second (the reference rate); its first renewal is in the
first slot after its release, so no lease waits more than one period. The measured phase starts when
every agent holds its lease and lasts 2 minutes (``--quick``: 500 agents for 30 s).

The client is one asyncio loop with a pool of 64 keep-alive HTTPS connections for the renewals
(HTTP/1.1, TLS checked against the server's CA) and 8 more for the fleet's releases, so renewals
neither queue behind the boot of the rest of the fleet nor lose all of the server to it. Latency is
from the moment a renewal starts (waiting for a free connection included) to its answer; the
readable lines also say how late the loop started renewals and how much CPU the server spent per
renewal in the measured phase.

Counted: renewals answered ``continue``; any other answer (``expired`` = the lease was lost),
errors (non-200, broken connections). Checked after the run, through the API: every agent's lease was
the one live lease of its volume when the run ended (``GET /v1/leases?volume=``: active, or expired only
since, as the renewals stopped), and the audit log holds no ``suspected_clone`` record. Then a clone of
one instance (``DevCloud.clone``) asks for that instance's volume and must be denied ``suspected_clone``
with exactly one alarm audited, so "no false alarm" is not vacuous.

Figures: ``leases_lost`` (target 0), ``false_clone_alarms`` (target 0), ``renewals_per_s`` (reference:
the schedule's rate N/10; ratio = achieved / scheduled) and ``renew_p99_ms`` (reference: the renewal
period; ratio = the share of the period a renewal takes). The client, the server and PostgreSQL share
this machine's cores. The last line is ``{"bench": "leases", "figures": [...]}`` (DESIGN.md section 7).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from _common import (
    BenchError,
    Cleanup,
    children,
    engine_server,
    figure,
    machine_cpu,
    make_temp_dir,
    process_cpu_seconds,
    run_bench,
    say,
)
from _lease_fleet import LEASE_SECONDS, POOL, RENEW_SECONDS, Agent, check_leases, clone_alarms, pct, run_fleet
from _release import World, b64, bulk_instances

BENCH = "leases"
ENGINES = ("sqlite", "postgresql")


def _renews(world: World, agent: Agent) -> bool:
    answer = world.public.post(f"/v1/leases/{agent.lease_id}/renew", {"token": b64(agent.token)})
    return bool(answer["action"] == "continue")


def run(args: argparse.Namespace, cleanup: Cleanup) -> list[dict[str, Any]]:
    engine = args.engine
    started = time.monotonic()
    server, pg = engine_server(cleanup, engine, workers=args.workers)
    work = make_temp_dir(cleanup, "ks-bench-leases-")
    world = World.make(server, work / "devcloud")
    cleanup.push("close API clients", world.close)
    agents = [Agent(i, inst) for i, inst in enumerate(bulk_instances(world.cloud, args.agents))]
    say(
        f"[{engine}] keysteward server {server.url} ({args.workers} worker(s)), tenant, key, devcloud provider and "
        f"{len(agents)} devcloud instances ready ({time.monotonic() - started:.1f} s)"
    )
    seq0 = world.admin.last_seq()

    assert server.proc is not None
    server_pids = [server.proc.pid, *children(server.proc.pid)]
    pg_pids = pg.pids() if pg else []

    def cpu() -> tuple[float, ...]:
        busy, total = machine_cpu()
        pids = sorted(set(pg_pids) | set(pg.pids() if pg else []))
        return process_cpu_seconds(server_pids), process_cpu_seconds(pids), time.process_time(), busy, total

    stats, (server_cpu, db_cpu, own_cpu, busy, total) = asyncio.run(run_fleet(world, agents, args.duration, cpu))
    ended = datetime.now(UTC)

    lost_by_answer = [a for a in agents if a.lost]
    # the clone check below needs a live lease: the first agent whose lease the run kept renews at once, as
    # it would go on doing. The run's renewals stopped at its end, and the checks next (5,000 lease listings,
    # the audit log of 60,000 renewals) can take longer than a lease's 30 s: a holder picked after them had
    # its lease run out meanwhile, and every agent was reported lost (seen once)
    holder = next((a for a in agents if not a.lost and _renews(world, a)), None)
    checking = threading.Event()

    def keep_renewing(agent: Agent) -> None:  # every 5 s while the checks run, as its agent would
        while not checking.wait(5) and _renews(world, agent):
            pass

    if holder is not None:
        threading.Thread(target=keep_renewing, args=(holder,), daemon=True).start()
    try:
        problems = asyncio.run(check_leases(world, agents, ended))
        lost = {a.index for a in lost_by_answer} | set(problems)
        alarms = clone_alarms(world, seq0)
    finally:
        checking.set()

    # prove the alarm works: a clone of that agent's instance asks for its volume
    if holder is None:
        raise BenchError(
            f"every one of the {len(agents)} leases was lost: {len(lost_by_answer)} renewal(s) answered other than "
            f"continue, e.g. {[a.lost for a in lost_by_answer[:3]]}; listing: {sorted(problems.items())[:3]}"
        )
    if not _renews(world, holder):  # again after the checks: the clone must meet a live lease
        raise BenchError(f"agent {holder.index}'s lease could not be renewed after the checks")
    seq1 = world.admin.last_seq()
    clone = world.cloud.clone(holder.instance.id)
    status, answer, _ = world.release(clone, holder.volume_id)
    clone_denied = status == 403 and answer.get("code") == "suspected_clone"
    new_alarms = clone_alarms(world, seq1)
    renewed = world.public.post(f"/v1/leases/{holder.lease_id}/renew", {"token": b64(holder.token)})
    if not clone_denied or len(new_alarms) != 1 or renewed["action"] != "continue":
        raise BenchError(
            f"the clone check failed: the clone's release answered {status} {answer}, {len(new_alarms)} alarm(s) "
            f"audited, the original's renewal answered {renewed}"
        )

    window = stats.t_end - stats.t_start
    measured = stats.window()
    answers: dict[str, int] = {}
    for r in measured:
        answers[r.action] = answers.get(r.action, 0) + 1
    done = sum(n for action, n in answers.items() if action != "error")
    rate = done / window
    target_rate = len(agents) / RENEW_SECONDS
    cores = os.cpu_count() or 1
    lat = [r.took * 1000 for r in measured if r.action != "error"]
    late = [(r.start - r.due) * 1000 for r in measured]
    say(
        f"[{engine}] renewals due in the {window:.0f} s window: {done} answered ({rate:,.1f}/s; schedule "
        f"{target_rate:,.0f}/s), answers {answers}" + (f" e.g. {stats.error_samples}" if stats.error_samples else "")
    )
    say(
        f"[{engine}]   renewal latency p50 {pct(lat, 50):.2f} ms  p90 {pct(lat, 90):.2f} ms"
        f"  p99 {pct(lat, 99):.2f} ms  max {max(lat, default=0):.1f} ms; "
        f"renewals started late by p50 {pct(late, 50):.1f} ms, p99 {pct(late, 99):.1f} ms"
        f" (mean {statistics.fmean(late) if late else 0:.1f} ms)"
    )
    slices = max(1, round(window / 30))
    by_slice = [
        [
            r.took * 1000
            for r in measured
            if r.action != "error" and k <= (r.due - stats.t_start) * slices / window < k + 1
        ]
        for k in range(slices)
    ]
    say(f"[{engine}]   p99 by {window / slices:.0f} s slice: " + ", ".join(f"{pct(x, 99):.1f} ms" for x in by_slice))
    early = stats.before()
    if early:
        early_answers: dict[str, int] = {}
        for r in early:
            early_answers[r.action] = early_answers.get(r.action, 0) + 1
        say(
            f"[{engine}]   while the fleet was still releasing: answers {early_answers}, latency p99 "
            f"{pct([r.took * 1000 for r in early], 99):.1f} ms, max {max(r.took for r in early) * 1000:.1f} ms"
        )
    say(
        f"[{engine}]   CPU in the window: server {server_cpu / window:.0%} of one core "
        f"({server_cpu * 1000 / max(1, done):.2f} ms/renewal)"
        + (f", PostgreSQL {db_cpu / window:.0%} ({db_cpu * 1000 / max(1, done):.2f} ms/renewal)" if pg else "")
        + f", this client {own_cpu / window:.0%}, other processes "
        f"{max(0.0, busy / max(1.0, total) * cores - (server_cpu + db_cpu + own_cpu) / window):.0%}; "
        f"machine {busy / max(1.0, total):.0%} busy of {cores} cores"
    )
    say(
        f"[{engine}]   after the run: {len(agents) - len(problems)} of {len(agents)} leases live when it ended"
        " (and no other on their volumes)"
        + (f"; e.g. {sorted(problems.items())[:3]}" if problems else "")
        + f"; {len(lost_by_answer)} renewal(s) answered other than continue"
        + (f" (e.g. agent {lost_by_answer[0].index}: {lost_by_answer[0].lost})" if lost_by_answer else "")
        + f"; {len(alarms)} suspected_clone record(s) in the audit log"
    )
    say(
        f"[{engine}]   clone check: a clone of agent {holder.index}'s instance was denied suspected_clone, one alarm "
        "audited, the original's lease renews"
    )
    return [
        figure("leases_lost", len(lost), "leases", len(agents), target=0, higher_is_better=False, digits=0),
        figure("false_clone_alarms", len(alarms), "alarms", len(agents), target=0, higher_is_better=False, digits=0),
        figure("renewals_per_s", rate, "renewals/s", target_rate),
        figure("renew_p99_ms", pct(lat, 99), "ms", RENEW_SECONDS * 1000.0, higher_is_better=False),
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 agents for 30 s (under 60 s in all)")
    parser.add_argument("--agents", type=int, default=None, help="simulated agents (default 5000; --quick: 500)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds of measured renewals (default 120; --quick: 30)"
    )
    parser.add_argument("--engine", choices=ENGINES, default="sqlite", help="database engine (default: sqlite)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="server worker processes (default: one per core)"
    )
    args = parser.parse_args(argv)
    if args.agents is None:
        args.agents = 500 if args.quick else 5000
    if args.duration is None:
        args.duration = 30.0 if args.quick else 120.0
    if args.agents < 2 or args.duration < RENEW_SECONDS:
        parser.error(f"--agents must be at least 2 and --duration at least {RENEW_SECONDS} s")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def work(cleanup: Cleanup) -> list[dict[str, Any]]:
        say(
            f"{BENCH}: {args.agents} agents renewing every {RENEW_SECONDS} s (lease {LEASE_SECONDS} s) for "
            f"{args.duration:g} s, {POOL} keep-alive connections, engine {args.engine}"
        )
        say(f"{BENCH}: this machine has {os.cpu_count()} CPU core(s), shared by this client and the server")
        return run(args, cleanup)

    return run_bench(BENCH, work, (20, 11))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
