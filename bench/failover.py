"""Failover figures: a keysteward server killed, the PostgreSQL primary killed, under a steady load.

    python bench/failover.py [--quick] [--runs N] [--seconds S]

One etcd and two PostgreSQL 15 nodes under Patroni (synchronous mode, strict; tests/support/patroni.py),
two keysteward servers on that database, and load threads releasing and renewing through the agent's
multi-URL client (tests/support/ha_load.py). Per run:

- releases per second for ``--seconds`` with every client on one server, then spread over two
  (``releases_two_servers_per_s``, reference: one server in the same run; the clients are Python threads
  on this machine's two shared cores, so the ratio says more about the servers' CPU than about scale);
- ``failover_server_s``: SIGKILL of a keysteward server to the first release answered, asked after the
  kill, at the other (target under 2 s);
- ``failover_db_s``: SIGKILL of the primary's node (Patroni and PostgreSQL) to the first release answered
  again. Two nodes in strict mode commit nothing until a synchronous standby is back, so this includes the
  old node's Patroni restarting (as systemd would, at once) and rejoining as the standby (docs/ha.md). The
  target, 35 s, is for Patroni's default timings (ttl 30, loop_wait 10, retry_timeout 10);
  ``failover_db_promote_s`` is the promotion alone;
- ``failover_lost_requests``: releases answered with success whose lease is missing afterwards (target 0).

``--quick`` cannot fit a failover with Patroni's default timings into 60 s: it uses ttl 15, loop_wait 2,
retry_timeout 5 (and keysteward's database timeout 3 s), one run of 3 s per throughput phase, and
compares ``failover_db_s`` with the same 35 s target. The figures are the median of ``--runs`` runs
(default 3), each on a fresh cluster.

The last line is the machine-readable result, printed by :func:`_common.run_bench`:
``{"bench": "failover", "figures": [{"name", "value", "unit", "reference", "ratio", "target", "ok"}, ...]}``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from typing import Any

from _common import (
    BenchError,
    Cleanup,
    KeystewardServer,
    figure,
    free_port,
    make_temp_dir,
    ratio_figure,
    run_bench,
    say,
    stop_process,
)
from _release import ACCOUNT, IMAGE, TENANT, World
from tests.support import patroni
from tests.support.ha_load import ReleaseLoad
from tests.support.pgcluster import PgUnavailable

VOLUMES_PER_THREAD = 4
THREADS = 4


def second_server(cleanup: Cleanup, first: KeystewardServer, env: dict[str, str]) -> KeystewardServer:
    """Another server on the same database: the first's configuration (same seal, same TLS files), its own port."""
    data_dir = make_temp_dir(cleanup, "ks-bench-data-")
    port = free_port()
    text = (first.data_dir / "keysteward.toml").read_text()
    (data_dir / "keysteward.toml").write_text(text.replace(f"listen_port = {first.port}", f"listen_port = {port}"))
    server = KeystewardServer(
        data_dir=data_dir, port=port, url=first.url.replace(str(first.port), str(port)), ca_file=first.ca_file,
        root_token=first.root_token, log_path=data_dir.parent / f"{data_dir.name}.log",
    )  # fmt: skip
    server._ssl = first._ssl
    cleanup.push(f"remove {server.log_path}", lambda: server.forget_log(cleanup.failed))
    server.start(cleanup, env=env)
    return server


def loads(world: World, urls_per_thread: list[list[str]], volumes: list[Any]) -> list[ReleaseLoad]:
    out = []
    for i, urls in enumerate(urls_per_thread):
        mine = volumes[i * VOLUMES_PER_THREAD : (i + 1) * VOLUMES_PER_THREAD]
        out.append(ReleaseLoad(urls, world.server.ca_file, TENANT, world.cloud, mine).start())
    return out


def stop_all(running: list[ReleaseLoad]) -> None:
    for load in running:
        load.stop()


def releases_per_s(world: World, urls: list[list[str]], volumes: list[Any], seconds: float) -> float:
    running = loads(world, urls, volumes)
    try:
        time.sleep(1.0)  # warm: connections, first releases
        before = sum(len(r.releases()) for r in running)
        time.sleep(seconds)
        after = sum(len(r.releases()) for r in running)
    finally:
        stop_all(running)
    return (after - before) / seconds


def first_after(running: list[ReleaseLoad], t0: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [f for f in (r.first_release_after(t0) for r in running) if f is not None]
        if found:
            return min(found)
        time.sleep(0.02)
    failed = [f for r in running for f in r.failed][-3:]
    raise BenchError(f"no release answered within {timeout:.0f} s of the fault; last failures: {failed}")


def one_run(args: argparse.Namespace, cleanup: Cleanup, n: int) -> dict[str, float]:
    mark = cleanup.mark()
    try:
        return _one_run(args, cleanup, n)
    finally:
        cleanup.unwind(mark)


def _one_run(args: argparse.Namespace, cleanup: Cleanup, n: int) -> dict[str, float]:
    started = time.monotonic()
    timings = patroni.Timings() if args.quick else patroni.DEFAULT_TIMINGS
    try:
        cluster = patroni.start(timings, prefix="ks-bench-ha-", nodes_count=args.nodes)
    except PgUnavailable as exc:
        raise BenchError(str(exc)) from exc
    cleanup.push("stop the Patroni cluster", cluster.stop)
    leader = cluster.wait_for("leader", 60)
    cluster.admin_sql(leader, "CREATE DATABASE keysteward_bench")
    env = {"KEYSTEWARD_STORAGE_DATABASE_TIMEOUT_SECONDS": "3" if args.quick else "10"}
    a = KeystewardServer.init(cleanup, database_url=cluster.url("keysteward_bench"))
    a.start(cleanup, env=env)
    b = second_server(cleanup, a, env)
    work = make_temp_dir(cleanup, "ks-bench-failover-")
    world = World.make(a, work / "devcloud")
    cleanup.push("close API clients", world.close)
    volumes = []
    for i in range(THREADS * VOLUMES_PER_THREAD):
        vm = world.cloud.create(account=ACCOUNT, image_id=IMAGE)
        volume_id, _secret = world.create_volume(f"ha-{i}")
        volumes.append((volume_id, vm))
    say(
        f"run {n}: Patroni ttl {timings.ttl} s, {args.nodes} PostgreSQL nodes, two servers, {len(volumes)} volumes "
        f"({time.monotonic() - started:.1f} s)"
    )

    one = releases_per_s(world, [[a.url]] * THREADS, volumes, args.seconds)
    two = releases_per_s(world, [[a.url, b.url], [b.url, a.url]] * (THREADS // 2), volumes, args.seconds)
    say(f"run {n}: releases/s one server {one:.1f}, two servers {two:.1f}")

    running = loads(world, [[a.url, b.url]] * THREADS, volumes)
    try:
        first_after(running, time.monotonic(), 30)
        assert a.proc is not None
        a.proc.kill()
        killed = time.monotonic()
        server_s = first_after(running, killed, 30)
        say(f"run {n}: keysteward server killed -> first release at the other after {server_s:.3f} s")
        time.sleep(1.0)
        old = cluster.wait_for("leader", 30)
        killed = cluster.kill_node(old)
        cluster.wait_for("leader", 120, not_node=old)
        promote_s = time.monotonic() - killed
        if args.nodes == 2:
            cluster.start_node(old)  # as systemd's Restart= would: two strict nodes need it back to commit
        db_s = first_after(running, killed, 180)
        say(f"run {n}: PostgreSQL primary killed -> promoted after {promote_s:.1f} s, first release after {db_s:.1f} s")
        time.sleep(1.0)
    finally:
        stop_all(running)
        if a.proc is not None:
            stop_process(a.proc)
    status, listed = b.request("GET", "/v1/leases", token=world.admin.token)
    if status != 200:
        raise BenchError(f"GET /v1/leases answered {status}")
    present = {lease["id"] for lease in listed}
    answered = [r for load in running for r in load.releases()]
    lost = sum(1 for r in answered if r.lease_id not in present)
    say(f"run {n}: {len(answered)} releases answered under faults, {lost} without their lease afterwards")
    shutil.rmtree(work, ignore_errors=True)
    return {"one": one, "two": two, "server_s": server_s, "db_s": db_s, "promote_s": promote_s, "lost": lost}


def run(args: argparse.Namespace, cleanup: Cleanup) -> list[dict[str, Any]]:
    results = [one_run(args, cleanup, n + 1) for n in range(args.runs)]

    def median(key: str) -> float:
        return float(statistics.median(r[key] for r in results))

    one, two = median("one"), median("two")
    return [
        figure("failover_server_s", median("server_s"), "s", 2.0, target=2.0, higher_is_better=False),
        figure("failover_db_s", median("db_s"), "s", 35.0, target=35.0, higher_is_better=False),
        figure("failover_db_promote_s", median("promote_s"), "s", 35.0, higher_is_better=False),
        figure("failover_lost_requests", max(r["lost"] for r in results), "req", 1.0, target=0, higher_is_better=False),
        ratio_figure("releases_two_servers_per_s", two, "rel/s", one, None),
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="aggressive Patroni timings, one run (see above)")
    parser.add_argument("--runs", type=int, default=None, help="runs on fresh clusters (default 3; --quick: 1)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per throughput phase (default 10)")
    parser.add_argument(
        "--nodes",
        type=int,
        choices=(2, 3),
        default=2,
        help="PostgreSQL nodes (3: a standby is left to be synchronous once the primary dies)",
    )
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    if args.runs < 1 or args.seconds < 1:
        parser.error("--runs and --seconds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_bench("failover", lambda cleanup: run(args, cleanup), (28, 6))


if __name__ == "__main__":
    raise SystemExit(main())
