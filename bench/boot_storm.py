"""Boot storm: 5,000 instances ask for their volumes' keys at once (an availability zone restarting).

    python bench/boot_storm.py [--quick] [--instances N] [--engine sqlite|postgresql] [--connections C]
                               [--workers N]

It starts a real ``keysteward`` server (dev seal, TLS, one worker per core, release nonces valid 900 s),
creates a tenant, the key ``volumes``, a devcloud registered as the tenant's ``aws-iid`` provider, N
devcloud instances and N volumes bound to the devcloud account (lease 30 s, renewal every 10 s), one
volume per instance; each volume's secret is kept from its creation answer.

Before the storm, each instance's request is made as the instance makes it: a challenge nonce from the
server, a one-time HPKE key, and the devcloud's identity document signed over sha256(nonce || key).
(The documents are signed by the cloud's metadata service, not by the key manager's machine, so they are
made before the clock starts, as bench/release.py does.) Then all N instances start at once: each sends
``POST /v1/release/challenge`` (the server does all of a challenge's work; its nonce is not used) and
``POST /v1/release`` with its request, over C keep-alive HTTPS connections shared by the fleet (default
128). The server verifies every identity document's PKCS#7 signature, its binding and its nonce:
there is no bypass, and one release with an altered document is checked to be denied
``evidence_invalid`` after the storm.

An instance *holds its key* when its answer is ``released`` and the sealed value opens, with its
one-time key, to the secret its volume was created with. Figures:

- ``boot_storm_s``: seconds from the start until the last instance holds its key (target: 15 s);
- ``boot_storm_failures``: instances that do not (a non-200 answer, an error, a wrong secret; target 0);
- ``boot_storm_p99_ms``: p99 of an instance's challenge + release, from its start to its answer;
- ``boot_storm_false_clones``: ``suspected_clone`` records in the audit log during the storm (target 0).

Reference, in the same run on the same server: N ``POST /v1/decrypt`` (envelope decrypts, the
foundation's KMS operation) over the same connections; ratios are storm / decrypts. ``--quick`` runs
500 instances and says so. The last line is ``{"bench": "boot_storm", "figures": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from _common import (
    BenchError,
    Cleanup,
    background_load,
    children,
    engine_server,
    figure,
    make_temp_dir,
    process_cpu_seconds,
    run_bench,
    say,
)
from _release import ACCOUNT, TENANT, HttpPool, World, bulk_instances, fetch_nonces, open_released, release_body, unpack

from keysteward.crypto.hpke import OneTimeKey
from keysteward.devcloud.provider import Instance
from keysteward.formats.release_wire import seal_info

BENCH = "boot_storm"
INSTANCES = 5000
QUICK_INSTANCES = 500
CONNECTIONS = 128
NONCE_TTL_SECONDS = 900
TARGET_S = 15.0
LEASE_SECONDS, RENEW_SECONDS = 30, 10


@dataclass
class Booting:
    instance: Instance
    volume_id: str = ""
    secret: bytes = b""
    body: dict[str, Any] | None = None
    otk: OneTimeKey | None = None
    took: float = math.inf  # seconds from its start to its answer
    done_at: float = math.inf  # seconds from the storm's start
    failure: str = ""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else 0.0


async def register(world: World, fleet: list[Booting], connections: int) -> None:
    """One volume per instance, its secret opened from the creation answer (the creating tool's key)."""
    pool = HttpPool(world.server.url, world.server.ca_file, connections, token=world.admin.token)
    otk = OneTimeKey.generate()

    async def one(k: int, booting: Booting) -> None:
        body = world.volume_request(f"boot{k:05d}", otk.public_bytes, LEASE_SECONDS, RENEW_SECONDS)
        status, answer = await pool.request("POST", "/v1/volumes", body)
        if status != 201:
            raise BenchError(f"POST /v1/volumes answered {status}: {answer}")
        booting.volume_id = str(answer["volume"]["id"])
        plain = otk.open(base64.b64decode(answer["sealed"]), seal_info(TENANT, booting.volume_id, "create"))
        booting.secret, _ = unpack(plain)

    try:
        await asyncio.gather(*(one(k, b) for k, b in enumerate(fleet)))
    finally:
        await pool.close()


async def storm(world: World, fleet: list[Booting], connections: int) -> float:
    """Every instance at once: challenge, then release with its request; returns the wall time."""
    pool = HttpPool(world.server.url, world.server.ca_file, connections)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(booting: Booting) -> None:
        try:
            status, answer = await pool.request("POST", "/v1/release/challenge", {})
            if status != 200:
                raise BenchError(f"challenge answered {status}: {answer}")
            status, answer = await pool.request("POST", "/v1/release", booting.body)
            if status != 200:
                raise BenchError(f"release answered {status}: {str(answer)[:300]}")
            assert booting.otk is not None
            secret, _, _ = open_released(answer, booting.otk, booting.volume_id)
            if secret != booting.secret:
                raise BenchError("the released secret is not the volume's")
        except (BenchError, OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
            booting.failure = str(exc) or type(exc).__name__
        booting.done_at = loop.time() - t0
        booting.took = booting.done_at

    try:
        await asyncio.gather(*(one(b) for b in fleet))
    finally:
        await pool.close()
    return loop.time() - t0


async def decrypts(world: World, count: int, connections: int) -> tuple[float, list[float]]:
    """The reference: ``count`` envelope decrypts at once over the same connections; (seconds, latencies)."""
    pair = world.admin.post("/v1/keys/volumes/generate-data-key", {"key_spec": "AES_256"})
    body = {"ciphertext": pair["ciphertext"]}
    pool = HttpPool(world.server.url, world.server.ca_file, connections, token=world.admin.token)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    took: list[float] = []

    async def one() -> None:
        status, answer = await pool.request("POST", "/v1/decrypt", body)
        if status != 200:
            raise BenchError(f"POST /v1/decrypt answered {status}: {answer}")
        took.append(loop.time() - t0)

    try:
        await asyncio.gather(*(one() for _ in range(count)))
    finally:
        await pool.close()
    return loop.time() - t0, took


def audit_counts(world: World, after: int) -> tuple[int, int, int]:
    """(released, denied, suspected_clone) volume.release records after ``after``."""
    released = denied = clones = 0
    for _, rec in world.admin.audit(after):
        if rec.get("reason") == "suspected_clone" or rec.get("details", {}).get("alert") == "suspected_clone":
            clones += 1
        if rec.get("action") != "volume.release":
            continue
        if rec.get("outcome") == "denied":
            denied += 1
        elif rec.get("details", {}).get("decision") == "released":
            released += 1
    return released, denied, clones


def check_forgery_denied(world: World, booting: Booting) -> None:
    """Evidence is really verified: an altered identity document (another account) is denied."""
    body, _ = release_body(world.cloud, booting.instance, booting.volume_id, world.challenge())
    identity = body["evidence"]["identity"]
    document = json.loads(base64.b64decode(identity["document"]))
    document["accountId"] = "999999999999"
    identity["document"] = base64.b64encode(json.dumps(document).encode()).decode()
    r = world.public.client.post("/v1/release", json=body)
    if r.status_code != 403 or r.json().get("code") != "evidence_invalid":
        raise BenchError(f"an altered identity document answered {r.status_code} {r.text[:300]}")


def run(args: argparse.Namespace, cleanup: Cleanup) -> list[dict[str, Any]]:
    engine, n = args.engine, args.instances
    started = time.monotonic()
    env = {"KEYSTEWARD_RELEASE_NONCE_TTL_SECONDS": str(NONCE_TTL_SECONDS)}
    server, pg = engine_server(cleanup, engine, workers=args.workers, env=env)
    work = make_temp_dir(cleanup, "ks-bench-boot-storm-")
    world = World.make(server, work / "devcloud")
    cleanup.push("close API clients", world.close)
    fleet = [Booting(i) for i in bulk_instances(world.cloud, n, account=ACCOUNT)]
    asyncio.run(register(world, fleet, args.connections))
    say(
        f"[{engine}] server ({args.workers} worker(s)), {n} instances and volumes ready "
        f"({time.monotonic() - started:.1f} s)"
    )

    made = time.monotonic()
    for booting, nonce in zip(fleet, fetch_nonces(server, n), strict=True):
        booting.body, booting.otk = release_body(world.cloud, booting.instance, booting.volume_id, nonce)
    say(
        f"[{engine}] {n} instance requests made (nonce, one-time key, signed identity document) "
        f"in {time.monotonic() - made:.1f} s"
    )

    assert server.proc is not None
    pids = [server.proc.pid, *children(server.proc.pid)]
    db_pids = pg.pids() if pg else []
    ref_s, ref_took = asyncio.run(decrypts(world, n, args.connections))
    say(f"[{engine}] reference: {n} envelope decrypts at once over {args.connections} connections in {ref_s:.2f} s "
        f"({n / ref_s:,.0f}/s), p99 {pct(ref_took, 99) * 1000:.0f} ms")  # fmt: skip

    seq0 = world.admin.last_seq()
    cpu0 = process_cpu_seconds(pids), process_cpu_seconds(db_pids)
    wall = asyncio.run(storm(world, fleet, args.connections))
    server_cpu = process_cpu_seconds(pids) - cpu0[0]
    db_cpu = process_cpu_seconds(db_pids) - cpu0[1]
    failed = [b for b in fleet if b.failure]
    held = [b for b in fleet if not b.failure]
    last = max((b.done_at for b in held), default=math.inf) if not failed else wall
    p99 = pct([b.took * 1000 for b in fleet], 99)
    released, denied, clones = audit_counts(world, seq0)
    say(
        f"[{engine}] boot storm: {len(held)} of {n} instances hold their key after {last:.2f} s "
        f"({n / wall:,.0f} instances/s), {len(failed)} failed" + (f", e.g. {failed[0].failure}" if failed else "")
    )
    say(f"[{engine}]   time to key: p50 {pct([b.took for b in fleet], 50) * 1000:.0f} ms  p99 {p99:.0f} ms; "
        f"server CPU {server_cpu * 1000 / n:.2f} ms per instance (challenge + release)"
        + (f", PostgreSQL {db_cpu * 1000 / n:.2f} ms" if pg else ""))  # fmt: skip
    say(f"[{engine}]   audit log: {released} released, {denied} denied volume.release records, "
        f"{clones} suspected_clone record(s)")  # fmt: skip
    if released != len(held):
        raise BenchError(f"the audit log holds {released} released records for {len(held)} keys held")
    check_forgery_denied(world, fleet[0])
    say(f"[{engine}]   checked: an altered identity document is denied evidence_invalid (evidence is verified)")
    return [
        figure("boot_storm_s", last, "s", ref_s, target=TARGET_S, higher_is_better=False, digits=2),
        figure("boot_storm_failures", len(failed), "instances", n, target=0, higher_is_better=False, digits=0),
        figure("boot_storm_p99_ms", p99, "ms", pct(ref_took, 99) * 1000, higher_is_better=False, digits=0),
        figure("boot_storm_false_clones", clones, "alarms", n, target=0, higher_is_better=False, digits=0),
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_INSTANCES} instances instead of {INSTANCES}")
    parser.add_argument("--instances", type=int, default=None, help=f"instances (default {INSTANCES})")
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help="keep-alive connections the fleet shares")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server worker processes")
    args = parser.parse_args(argv)
    if args.instances is None:
        args.instances = QUICK_INSTANCES if args.quick else INSTANCES
    if args.instances < 2 or args.connections < 1:
        parser.error("--instances must be at least 2 and --connections at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def work(cleanup: Cleanup) -> list[dict[str, Any]]:
        quick = f" (--quick: {args.instances}, not {INSTANCES})" if args.instances != INSTANCES else ""
        say(f"{BENCH}: {args.instances} instances{quick} ask for their keys at once over {args.connections} "
            f"connections, engine {args.engine}, real evidence verification")  # fmt: skip
        say(f"{BENCH}: this machine has {os.cpu_count()} CPU core(s); before the run other processes kept "
            f"{background_load():.0%} busy")  # fmt: skip
        return run(args, cleanup)

    return run_bench(BENCH, work, (24, 11))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
