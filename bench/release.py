"""Key release over HTTPS: complete releases per second and their latency, 32 concurrent agents.

    python bench/release.py [--quick] [--duration S] [--engines sqlite,postgresql] [--workers N]

For each engine (SQLite in the data directory; PostgreSQL on a throw-away local cluster) it starts a
real ``keysteward`` server (dev seal, TLS, one worker per core, release nonces valid 900 s), creates a
tenant, the key ``volumes``, a devcloud registered as the tenant's ``aws-iid`` provider, 32 instances
and 32 volumes bound to the devcloud account, one volume per instance.

A *complete release* is what an agent does: ``POST /v1/release/challenge``, then ``POST /v1/release``
with evidence (a devcloud identity document signed over sha256(nonce || one-time HPKE public key));
the server verifies the nonce and the evidence, decides, spends the nonce, supersedes the agent's
previous lease and grants a new one, appends the audit record and seals the volume's secret with HPKE.

Evidence is made by the instance, not by the key manager's machine, so the request bodies are made
before the timed phase: nonces fetched from the server, documents signed by the devcloud (in worker
processes), one body per nonce, written to a file. ``wrk`` (32 connections, 2 threads) then drives the
server with a Lua script in which each thread alternates a challenge (its answer discarded: the server
still does all the challenge's work) and a release with the next unused body of its own slice of the
file (each body is sent once; a reused nonce would be denied 403, and any non-2xx answer fails the
run). Releases/s = released answers / run time; wrk's latency percentiles cover both request kinds.
The number of bodies is sized from a warm-up run of the same script; running out fails the run.

Checked after each run: the audit log holds one ``volume.release`` record with decision ``released``
per release the server completed and no denial, and one more release made end to end in Python opens
to the secret returned when the volume was created.

Reference, measured in the same run on the same server: ``POST /v1/decrypt`` (the foundation's KMS
operation, as in bench/kms_ops.py) with the same wrk set-up; ratio = releases/s / decrypt ops/s (for
latencies: release latency / decrypt latency). Targets (issue 4): at least 500 releases/s and p99
under 50 ms, on both engines.

wrk, the server and PostgreSQL share this machine's cores; the readable lines say how the CPU time was
split. The last line is ``{"bench": "release", "figures": [...]}`` (DESIGN.md section 7).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    BenchError,
    Cleanup,
    PgCluster,
    WrkMeasurement,
    check_engine_args,
    cpu_line,
    engine_server,
    figure,
    lua_string,
    machine_cpu,
    make_temp_dir,
    measure_wrk,
    report_figures,
    say,
    wrk_binary,
    wrk_post_script,
)
from _release import World, fetch_nonces, open_released, release_body

from keysteward.devcloud.provider import DevCloud, Instance

BENCH = "release"
ENGINES = ("sqlite", "postgresql")
AGENTS = 32
CONNECTIONS = 32
THREADS = 2
NONCE_TTL_SECONDS = 900
TARGET_RELEASES = 500.0  # releases/s, at least
TARGET_P99_MS = 50.0  # ms, at most
MARKER = "KSBENCH"


# -- request bodies, made before the timed phase ----------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(state: str, instances: list[dict[str, Any]], volume_ids: list[str]) -> None:
    _worker["cloud"] = DevCloud(Path(state))
    _worker["instances"] = [Instance.from_json(i) for i in instances]
    _worker["volumes"] = volume_ids


def _make_bodies(job: tuple[int, list[str]]) -> list[str]:
    """JSON lines for nonces ``job[1]``; body k of the whole file goes to agent k mod AGENTS."""
    import json

    first, nonces = job
    cloud, instances, volumes = _worker["cloud"], _worker["instances"], _worker["volumes"]
    lines = []
    for k, nonce in enumerate(nonces, start=first):
        agent = k % len(instances)
        body, _ = release_body(cloud, instances[agent], volumes[agent], nonce)
        lines.append(json.dumps(body, separators=(",", ":")))
    return lines


def make_bodies(world: World, instances: list[Instance], volume_ids: list[str], count: int, path: Path) -> float:
    """``count`` release bodies in ``path``, one JSON per line; returns the seconds it took."""
    started = time.monotonic()
    nonces = fetch_nonces(world.server, count)
    chunk = 500
    jobs = [(i, nonces[i : i + chunk]) for i in range(0, len(nonces), chunk)]
    ctx = multiprocessing.get_context("spawn")  # not fork: a fork while threads hold locks can hang the child
    with ctx.Pool(
        os.cpu_count() or 1,
        initializer=_init_worker,
        initargs=(str(world.cloud.state), [i.to_json() for i in instances], volume_ids),
    ) as pool:
        with path.open("w") as out:
            for lines in pool.imap(_make_bodies, jobs):
                out.write("\n".join(lines) + "\n")
    return time.monotonic() - started


def release_script(path: Path, bodies: Path, threads: int) -> Path:
    """The wrk Lua script: each thread alternates a challenge and a release with its next unused body."""
    path.write_text(
        f"""
local bodies_file = {lua_string(str(bodies))}
local nthreads = {threads}
local threads = {{}}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  bodies = {{}}
  local i = 0
  for line in io.lines(bodies_file) do
    if i % nthreads == id then bodies[#bodies + 1] = line end
    i = i + 1
  end
  local headers = {{["Content-Type"] = "application/json"}}
  challenge = wrk.format("POST", "/v1/release/challenge", headers, "{{}}")
  release_headers = headers
  used, released, exhausted, turn = 0, 0, 0, 0
  failures = {{}}
end

function request()
  turn = 1 - turn
  if turn == 1 then return challenge end
  local body = bodies[used + 1]
  if body == nil then
    exhausted = 1
    return challenge
  end
  used = used + 1
  return wrk.format("POST", "/v1/release", release_headers, body)
end

function response(status, headers, body)
  if status == 200 and string.find(body, '"sealed"', 1, true) then released = released + 1 end
  if status >= 300 and #failures < 3 then failures[#failures + 1] = status .. " " .. string.sub(body, 1, 400) end
end

function done(summary, latency, requests)
  local u, r, x, n = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    u = u + t:get("used")
    r = r + t:get("released")
    x = x + t:get("exhausted")
    n = n + #t:get("bodies")
  end
  io.write(string.format("{MARKER} bodies=%d used=%d released=%d exhausted=%d\\n", n, u, r, x))
  for _, t in ipairs(threads) do
    for _, f in ipairs(t:get("failures")) do io.write("answer: " .. f .. "\\n") end
  end
end
"""
    )
    return path


@dataclass
class ReleaseRun:
    m: WrkMeasurement
    bodies: int
    used: int
    released: int
    exhausted: bool

    @property
    def per_s(self) -> float:
        return self.released / self.m.wrk.seconds


def run_releases(
    world: World,
    pg: PgCluster | None,
    instances: list[Instance],
    volume_ids: list[str],
    count: int,
    seconds: float,
    work: Path,
    name: str,
) -> tuple[ReleaseRun, float]:
    bodies = work / f"{name}.jsonl"
    made_in = make_bodies(world, instances, volume_ids, count, bodies)
    script = release_script(work / f"{name}.lua", bodies, THREADS)
    m = measure_wrk(
        world.server,
        pg,
        "release",
        world.server.url + "/v1/release",
        script,
        seconds,
        warmup=0,
        connections=CONNECTIONS,
        threads=THREADS,
    )
    line = next((x for x in m.wrk.text.splitlines() if x.startswith(MARKER)), None)
    if line is None:
        raise BenchError(f"the wrk script printed no {MARKER} line:\n{m.wrk.text}")
    got = dict(part.split("=") for part in line.split()[1:])
    bodies.unlink()
    run = ReleaseRun(m, int(got["bodies"]), int(got["used"]), int(got["released"]), got["exhausted"] != "0")
    if run.bodies != count:
        raise BenchError(f"wrk threads loaded {run.bodies} bodies, not the {count} made")
    return run, made_in


# -- one engine ------------------------------------------------------------------------------


def run_engine(engine: str, cleanup: Cleanup, seconds: float, warmup: float, workers: int) -> list[dict[str, Any]]:
    mark = cleanup.mark()
    try:
        started = time.monotonic()
        server, pg = engine_server(
            cleanup, engine, workers=workers, env={"KEYSTEWARD_RELEASE_NONCE_TTL_SECONDS": str(NONCE_TTL_SECONDS)}
        )
        work = make_temp_dir(cleanup, "ks-bench-release-")
        world = World.make(server, work / "devcloud")
        cleanup.push("close API clients", world.close)
        instances = [world.cloud.create(account="111122223333", image_id="img-bench") for _ in range(AGENTS)]
        volumes = [world.create_volume(f"vol{i:02d}") for i in range(AGENTS)]
        volume_ids = [v for v, _ in volumes]
        say(
            f"[{engine}] keysteward server {server.url} ({workers} worker(s)), tenant, key, devcloud provider, "
            f"{AGENTS} instances and {AGENTS} volumes ready ({time.monotonic() - started:.1f} s)"
        )

        # the foundation's decrypt, same server, same wrk set-up
        pair = world.admin.post("/v1/keys/volumes/generate-data-key", {"key_spec": "AES_256"})
        decrypt = measure_wrk(
            server,
            pg,
            "decrypt",
            server.url + "/v1/decrypt",
            wrk_post_script(work / "decrypt.lua", {"ciphertext": pair["ciphertext"]}, world.admin.token),
            seconds,
            warmup=warmup,
            connections=CONNECTIONS,
            threads=THREADS,
        )
        d = decrypt.wrk
        say(
            f"[{engine}] reference decrypt: {d.rps:,.1f} ops/s  p50 {d.p50_ms:.2f} ms  p99 {d.p99_ms:.2f} ms  "
            f"({d.requests} requests in {d.seconds:.1f} s, 0 non-2xx)"
        )
        say(cpu_line(engine, decrypt))

        # warm-up with the release script: sizes the timed run's bodies
        calib = max(1000, int(1000 * warmup))
        seq0 = world.admin.last_seq()
        warm, made_in = run_releases(world, pg, instances, volume_ids, calib, warmup, work, "warmup")
        rate = warm.used / warm.m.wrk.seconds
        if warm.exhausted:
            rate *= 2  # the warm-up ran out: it only says the rate is above this
        count = math.ceil(rate * seconds * 1.5) + 500
        say(
            f"[{engine}] warm-up: {warm.per_s:,.0f} releases/s over {warm.m.wrk.seconds:.1f} s "
            f"({calib} bodies made in {made_in:.1f} s); making {count} bodies for {seconds:g} s"
        )

        try:
            run, made_in = run_releases(world, pg, instances, volume_ids, count, seconds, work, "timed")
        except BenchError as exc:
            logs = f"{exc}\nserver log (last lines):\n{server.log_tail(20)}"
            if pg is not None:
                pg_log = pg.cluster.data_dir.parent / "server.log"
                tail = pg_log.read_text(errors="replace").splitlines()[-20:] if pg_log.exists() else []
                logs += "\nPostgreSQL log (last lines):\n" + "\n".join(tail)
            raise BenchError(logs) from None
        if run.exhausted:
            raise BenchError(f"wrk used all {run.bodies} pre-made bodies before the end of the run: rerun")
        w = run.m.wrk
        say(
            f"[{engine}] release: {run.per_s:,.1f} complete releases/s (challenge + release; {run.released} in "
            f"{w.seconds:.1f} s; {count} bodies made in {made_in:.1f} s before the run, {run.used} sent)"
        )
        say(
            f"[{engine}]   latency over all {w.requests} requests (challenges and releases alike): "
            f"p50 {w.p50_ms:.2f} ms  p75 {w.p75_ms:.2f} ms  p90 {w.p90_ms:.2f} ms  p99 {w.p99_ms:.2f} ms, 0 non-2xx"
        )
        say(cpu_line(engine, run.m, per=run.released, what="release"))

        # the audit log: one released record per release the server completed, no denial
        released = denied = other = 0
        for _, rec in world.admin.audit(seq0):
            if rec.get("action") != "volume.release":
                continue
            if rec.get("outcome") == "denied":
                denied += 1
            elif rec.get("details", {}).get("decision") == "released":
                released += 1
            else:
                other += 1
        expected_low, expected_high = warm.released + run.released, warm.used + run.used
        if denied or other or not expected_low <= released <= expected_high:
            raise BenchError(
                f"audit log: {released} released, {denied} denied, {other} other volume.release records; wrk saw "
                f"{expected_low} released answers and sent {expected_high} release requests"
            )
        # one more release end to end, as an agent: the sealed answer opens to the volume's secret
        status, answer, otk = world.release(instances[0], volume_ids[0])
        if status != 200:
            raise BenchError(f"the end-to-end release answered {status}: {answer}")
        secret, _, _ = open_released(answer, otk, volume_ids[0])
        if secret != volumes[0][1]:
            raise BenchError("the released secret is not the one returned at volume creation")
        say(
            f"[{engine}]   checked: the audit log holds {released} released volume.release records for "
            f"{expected_low}-{expected_high} releases (answered - sent), 0 denials; "
            "an end-to-end release opens to the volume's secret"
        )
    finally:
        cleanup.unwind(mark)

    ref = decrypt.wrk
    figures = [
        figure(f"release_per_s_{engine}", run.per_s, "releases/s", ref.rps, target=TARGET_RELEASES),
        figure(f"release_p50_ms_{engine}", w.p50_ms, "ms", ref.p50_ms, higher_is_better=False),
        figure(f"release_p99_ms_{engine}", w.p99_ms, "ms", ref.p99_ms, target=TARGET_P99_MS, higher_is_better=False),
    ]
    return figures


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, SQLite only (under 60 s in all)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per wrk measurement (default 20, or 5 with --quick)"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="server worker processes (default: one per core)"
    )
    parser.add_argument(
        "--engines", default=None, help="comma-separated engines (default: sqlite,postgresql; --quick: sqlite)"
    )
    args = parser.parse_args(argv)
    args.engines = args.engines or ("sqlite" if args.quick else ",".join(ENGINES))
    check_engine_args(parser, args, ENGINES)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    warmup = 1.0 if args.quick else 3.0
    cleanup = Cleanup()
    try:
        wrk_binary()
        cores = os.cpu_count() or 1
        say(
            f"{BENCH}: {AGENTS} agents, wrk -c {CONNECTIONS} -t {THREADS} --latency, {args.duration:g} s per "
            f"measurement (after a {warmup:g} s warm-up), engines: {', '.join(args.engines)}"
        )
        say(
            f"{BENCH}: this machine has {cores} CPU core(s), shared by wrk, the keysteward server and PostgreSQL; "
            "evidence and bodies are made before each timed run"
        )
        busy0, total0 = machine_cpu()
        time.sleep(0.5)
        busy1, total1 = machine_cpu()
        say(f"{BENCH}: before the run, other processes kept {(busy1 - busy0) / max(1.0, total1 - total0):.0%} busy")
        figures: list[dict[str, Any]] = []
        for engine in args.engines:
            figures += run_engine(engine, cleanup, args.duration, warmup, args.workers)
    except BenchError as exc:
        print(f"{BENCH}: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{BENCH}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        cleanup.run()
    say(f"{BENCH}: release p50/p99 cover challenges and releases alike (wrk measures both request kinds)")
    report_figures(BENCH, figures, started, (28, 10))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
