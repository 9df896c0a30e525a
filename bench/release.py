"""Key release over HTTPS: complete releases per second and their latency, 32 concurrent agents.

    python bench/release.py [--quick] [--duration S] [--engines sqlite,postgresql] [--workers N]
                            [--evidence identity|tpm]

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
latencies: release latency / decrypt latency). Targets (issue 15, raised from issue 4's 500/s): at
least 800 releases/s on SQLite and 600/s on PostgreSQL, p99 under 50 ms on both.

``--evidence tpm`` (issue 5) adds platform evidence: each release also carries a real TPM2 quote
(``evidence.tpm``, PCRs sha256:0,7) with qualifying data = the same binding as the identity document.
Two swtpm processes (one per core) each get an EK and an AK from the agent's driver; an admin pins the
AK for the instances that use that TPM (``PUT /v1/attest/tpm/keys``, agent k on TPM k mod 2) and sets a
policy set of the built-in binding rule plus a ``forbid ... unless`` the platform is ``tpm2`` with the
swtpm's PCR 7 (checked before the warm-up: a release without a quote, and one with the other TPM's
quote, are refused). The server then verifies every quote against the instance's enrolled AK. The quotes
are made with the bodies, in the same worker processes, before each timed phase (see bench/_tpm.py for
how, and why not with one tpm2_quote process each); the output says how long they took. The audit check
also requires every released record to name its instance's AK in ``details.platform.tpm_ak``, and the
end-to-end release carries a quote made by the agent's own ``TpmDevice.quote``. Figures are named
``release_tpm_*``; target (issue 5): at least 300 releases/s.

wrk, the server and PostgreSQL share this machine's cores; the readable lines say how the CPU time was
split. The last line is ``{"bench": "release", "figures": [...]}`` (DESIGN.md section 7).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    BenchError,
    Cleanup,
    background_load,
    check_engine_args,
    cpu_line,
    engine_server,
    figure,
    make_temp_dir,
    measure_wrk,
    run_bench,
    say,
    wrk_binary,
    wrk_post_script,
)
from _release import ACCOUNT, PROVIDER, World, open_released
from _release_runs import CONNECTIONS, THREADS, check_audit, made_line, run_releases
from _tpm import TpmSite

from keysteward.devcloud.provider import Instance

BENCH = "release"
ENGINES = ("sqlite", "postgresql")
AGENTS = 32
NONCE_TTL_SECONDS = 900
TARGET_RELEASES = {"sqlite": 800.0, "postgresql": 600.0}  # releases/s, at least (issue 15, identity evidence)
TARGET_P99_MS = 50.0  # ms, at most (issues 4 and 15, identity evidence)
TARGET_TPM_RELEASES = 300.0  # releases/s, at least (issue 5, identity and TPM evidence); no latency target
EVIDENCE = ("identity", "tpm")
TPMS = min(2, os.cpu_count() or 1)  # swtpm processes with --evidence tpm: one per core quotes in parallel


def tpm_site(
    cleanup: Cleanup, engine: str, world: World, work: Path, instances: list[Instance], vols: list[str]
) -> TpmSite:
    """The swtpms, their AKs pinned for the instances, the policy that requires them, and proof it does."""
    started = time.monotonic()
    site = TpmSite.start(cleanup, work / "tpm", min(TPMS, AGENTS))
    done = site.require(world, [f"{PROVIDER}/{ACCOUNT}/{i.id}" for i in instances], instances[0], vols[0])
    say(f"[{engine}] {done} ({time.monotonic() - started:.1f} s)")
    return site


# -- one engine ------------------------------------------------------------------------------


def run_engine(
    engine: str, cleanup: Cleanup, seconds: float, warmup: float, workers: int, evidence: str
) -> list[dict[str, Any]]:
    mark = cleanup.mark()
    tag = f"{engine}{'/tpm' if evidence == 'tpm' else ''}"
    try:
        started = time.monotonic()
        server, pg = engine_server(
            cleanup, engine, workers=workers, env={"KEYSTEWARD_RELEASE_NONCE_TTL_SECONDS": str(NONCE_TTL_SECONDS)}
        )
        work = make_temp_dir(cleanup, "ks-bench-release-")
        world = World.make(server, work / "devcloud")
        cleanup.push("close API clients", world.close)
        instances = [world.cloud.create(account=ACCOUNT, image_id="img-bench") for _ in range(AGENTS)]
        volumes = [world.create_volume(f"vol{i:02d}") for i in range(AGENTS)]
        volume_ids = [v for v, _ in volumes]
        say(
            f"[{tag}] keysteward server {server.url} ({workers} worker(s)), tenant, key, devcloud provider, "
            f"{AGENTS} instances and {AGENTS} volumes ready ({time.monotonic() - started:.1f} s)"
        )
        site = tpm_site(cleanup, tag, world, work, instances, volume_ids) if evidence == "tpm" else None
        tpm_ports = site.ports if site else []
        tpms = len(tpm_ports)

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
            f"[{tag}] reference decrypt: {d.rps:,.1f} ops/s  p50 {d.p50_ms:.2f} ms  p99 {d.p99_ms:.2f} ms  "
            f"({d.requests} requests in {d.seconds:.1f} s, 0 non-2xx)"
        )
        say(cpu_line(engine, decrypt))

        # warm-up with the release script: sizes the timed run's bodies
        calib = max(1000, int(1000 * warmup))
        seq0 = world.admin.last_seq()
        warm, made = run_releases(world, pg, instances, volume_ids, calib, warmup, work, "warmup", tpm_ports)
        rate = warm.used / warm.m.wrk.seconds
        if warm.exhausted:
            rate *= 2  # the warm-up ran out: it only says the rate is above this
        # the 3 s warm-up starts cold: a timed run on SQLite went 1.75x its rate (451 -> over 790/s) and ran out
        count = math.ceil(rate * seconds * 2.5) + 500
        say(
            f"[{tag}] warm-up: {warm.per_s:,.0f} releases/s over {warm.m.wrk.seconds:.1f} s "
            f"({made_line(calib, made, tpms)}); making {count} bodies for {seconds:g} s"
        )

        try:
            run, made = run_releases(world, pg, instances, volume_ids, count, seconds, work, "timed", tpm_ports)
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
        what = "complete releases/s with a TPM quote each" if site else "complete releases/s"
        say(
            f"[{tag}] release: {run.per_s:,.1f} {what} (challenge + release; {run.released} in "
            f"{w.seconds:.1f} s; {made_line(count, made, tpms)} before the run, {run.used} sent)"
        )
        say(
            f"[{tag}]   latency over all {w.requests} requests (challenges and releases alike): "
            f"p50 {w.p50_ms:.2f} ms  p75 {w.p75_ms:.2f} ms  p90 {w.p90_ms:.2f} ms  p99 {w.p99_ms:.2f} ms, 0 non-2xx"
        )
        say(cpu_line(engine, run.m, per=run.released, what="release"))

        # the audit log: one released record per release the server completed, no denial, the right AK
        low, high = warm.released + run.released, warm.used + run.used
        ak_of = {i.id: site.ak_names[site.tpm_of(k)] for k, i in enumerate(instances)} if site else None
        released = check_audit(world, seq0, low, high, ak_of)
        # one more release end to end, as an agent (its quote by the agent's own driver, tpm2-tools)
        platform = functools.partial(site.agent_evidence, 0) if site else None
        status, answer, otk = world.release(instances[0], volume_ids[0], platform=platform)
        if status != 200:
            raise BenchError(f"the end-to-end release answered {status}: {answer}")
        secret, _, _ = open_released(answer, otk, volume_ids[0])
        if secret != volumes[0][1]:
            raise BenchError("the released secret is not the one returned at volume creation")
        say(
            f"[{tag}]   checked: the audit log holds {released} released volume.release records for "
            f"{low}-{high} releases (answered - sent), 0 denials"
            + (", each naming its instance's TPM AK in details.platform.tpm_ak" if site else "")
            + "; an end-to-end release"
            + (" with a tpm2_quote quote (the agent's TpmDevice)" if site else "")
            + " opens to the volume's secret"
        )
    finally:
        cleanup.unwind(mark)

    ref = decrypt.wrk
    if site:
        return [
            figure(f"release_tpm_per_s_{engine}", run.per_s, "releases/s", ref.rps, target=TARGET_TPM_RELEASES),
            figure(f"release_tpm_p50_ms_{engine}", w.p50_ms, "ms", ref.p50_ms, higher_is_better=False),
            figure(f"release_tpm_p99_ms_{engine}", w.p99_ms, "ms", ref.p99_ms, higher_is_better=False),
        ]
    return [
        figure(f"release_per_s_{engine}", run.per_s, "releases/s", ref.rps, target=TARGET_RELEASES[engine]),
        figure(f"release_p50_ms_{engine}", w.p50_ms, "ms", ref.p50_ms, higher_is_better=False),
        figure(f"release_p99_ms_{engine}", w.p99_ms, "ms", ref.p99_ms, target=TARGET_P99_MS, higher_is_better=False),
    ]


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
    parser.add_argument(
        "--evidence",
        choices=EVIDENCE,
        default="identity",
        help="identity: the identity document only (issue 4); tpm: plus a TPM2 quote each (issue 5)",
    )
    args = parser.parse_args(argv)
    args.engines = args.engines or ("sqlite" if args.quick else ",".join(ENGINES))
    check_engine_args(parser, args, ENGINES)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    warmup = 1.0 if args.quick else 3.0

    def work(cleanup: Cleanup) -> list[dict[str, Any]]:
        wrk_binary()
        cores = os.cpu_count() or 1
        say(
            f"{BENCH}: {AGENTS} agents, wrk -c {CONNECTIONS} -t {THREADS} --latency, {args.duration:g} s per "
            f"measurement (after a {warmup:g} s warm-up), engines: {', '.join(args.engines)}"
            + (f", evidence: identity + TPM2 quote ({TPMS} swtpm)" if args.evidence == "tpm" else "")
        )
        say(
            f"{BENCH}: this machine has {cores} CPU core(s), shared by wrk, the keysteward server and PostgreSQL; "
            "evidence and bodies are made before each timed run"
        )
        say(f"{BENCH}: before the run, other processes kept {background_load():.0%} busy")
        figures: list[dict[str, Any]] = []
        for engine in args.engines:
            figures += run_engine(engine, cleanup, args.duration, warmup, args.workers, args.evidence)
        return figures

    closing = f"{BENCH}: release p50/p99 cover challenges and releases alike (wrk measures both request kinds)"
    return run_bench(BENCH, work, (28, 10), closing=closing)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
