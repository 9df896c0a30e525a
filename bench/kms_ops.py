"""KMS envelope operations over HTTPS: decrypt and generate-data-key throughput and latency.

    python bench/kms_ops.py [--quick] [--duration S] [--engines sqlite,postgresql]

For each engine (SQLite in the data directory; PostgreSQL on a throw-away local cluster this
script starts and stops) it initialises and starts a real ``keysteward`` server (dev seal, TLS),
creates a tenant and a key with the CLI, and drives the server with ``wrk`` (16 connections,
2 threads, a Lua script that POSTs a fixed body with a bearer token) for

* ``POST /v1/decrypt`` of a ciphertext made beforehand, and
* ``POST /v1/keys/bench-key/generate-data-key`` (AES_256).

Any non-2xx answer or socket error fails the run. The reference, measured in the same run, is the
same AES-256-GCM work done in-process with ``cryptography`` on one thread (decrypt: open a sealed
32-byte data key with AAD; generate: 32 random bytes + seal): the ceiling, with no HTTP, TLS,
authentication, database or audit. ``ratio`` = server ops/s / reference ops/s; for latencies the
reference is the in-process time per operation and ratio = value / reference.

wrk runs on the same machine as the server (and PostgreSQL), so they share its CPU cores; the
readable lines say how many cores there are and how the CPU time was split.

The last line is the machine-readable result:
``{"bench": "kms_ops", "figures": [{"name", "value", "unit", "reference", "ratio", "target", "ok"}, ...]}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import (
    BenchError,
    Cleanup,
    KeystewardServer,
    PgCluster,
    WrkMeasurement,
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

BENCH = "kms_ops"
ENGINES = ("sqlite", "postgresql")
CONNECTIONS = 16
THREADS = 2
KEY_NAME = "bench-key"
TARGET_DECRYPT_OPS = 1500.0  # SQLite, ops/s, at least
TARGET_DECRYPT_P99_MS = 25.0  # SQLite, ms, at most


# -- reference -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    decrypt_ops: float
    generate_ops: float

    def ops(self, op: str) -> float:
        return self.decrypt_ops if op == "decrypt" else self.generate_ops

    def ms_per_op(self, op: str) -> float:
        return 1000.0 / self.ops(op)


def _rate(fn: Callable[[], object], seconds: float, batch: int = 2000) -> float:
    for _ in range(batch // 10):  # warm up
        fn()
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        count += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


def measure_reference(seconds: float) -> Reference:
    """The server's AES-256-GCM work per request, in-process and single-threaded (see module doc)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kek = AESGCM(os.urandom(32))
    aad = f"keysteward/v1/envelope|{uuid.uuid4()}|{uuid.uuid4()}|1|".encode() + b"{}"
    nonce = os.urandom(12)
    sealed = nonce + kek.encrypt(nonce, os.urandom(32), aad)

    def decrypt() -> bytearray:
        data = bytes(sealed)
        return bytearray(kek.decrypt(data[:12], data[12:], aad))

    def generate() -> bytes:
        data_key = bytearray(os.urandom(32))
        n = os.urandom(12)
        return n + kek.encrypt(n, bytes(data_key), aad)

    return Reference(decrypt_ops=_rate(decrypt, seconds), generate_ops=_rate(generate, seconds))


# -- one engine ------------------------------------------------------------------------------


OpResult = WrkMeasurement


def measure(
    server: KeystewardServer, pg: PgCluster | None, op: str, url: str, script: Any, seconds: float, warmup: float
) -> OpResult:
    return measure_wrk(server, pg, op, url, script, seconds, warmup=warmup, connections=CONNECTIONS, threads=THREADS)


def report(engine: str, r: OpResult, ref: Reference) -> None:
    w = r.wrk
    say(
        f"[{engine}] {r.op}: {w.rps:,.1f} req/s  p50 {w.p50_ms:.2f} ms  p75 {w.p75_ms:.2f} ms  "
        f"p90 {w.p90_ms:.2f} ms  p99 {w.p99_ms:.2f} ms  ({w.requests} requests in {w.seconds:.1f} s, "
        f"0 non-2xx)  = {w.rps / ref.ops(r.op):.2e} of the in-process reference"
    )
    say(cpu_line(engine, r))


def run_engine(
    engine: str, cleanup: Cleanup, ref: Reference, seconds: float, warmup: float, workers: int
) -> list[dict[str, Any]]:
    mark = cleanup.mark()
    try:
        started = time.monotonic()
        server, pg = engine_server(cleanup, engine, workers=workers)
        tenant = server.cli(["tenant", "create", "acme", "--json"], token=server.root_token)
        admin = tenant["admin_token"]["token"]
        server.cli(["key", "create", KEY_NAME, "--json"], token=admin)
        gdk_path = f"/v1/keys/{KEY_NAME}/generate-data-key"
        pair = server.post_ok(gdk_path, {"key_spec": "AES_256"}, admin)
        opened = server.post_ok("/v1/decrypt", {"ciphertext": pair["ciphertext"]}, admin)
        if opened.get("plaintext") != pair["plaintext"]:
            raise BenchError("decrypt did not give back the data key generate-data-key returned")
        where = "SQLite file in the data dir" if engine == "sqlite" else "PostgreSQL"
        say(
            f"[{engine}] keysteward server {server.url} pid {server.proc.pid if server.proc else '?'} on {where}, "
            f"tenant and key ready ({time.monotonic() - started:.1f} s)"
        )

        scripts = make_temp_dir(cleanup, "ks-bench-wrk-")
        runs = [
            measure(
                server,
                pg,
                "decrypt",
                server.url + "/v1/decrypt",
                wrk_post_script(scripts / "decrypt.lua", {"ciphertext": pair["ciphertext"]}, admin),
                seconds,
                warmup,
            ),
            measure(
                server,
                pg,
                "generate_data_key",
                server.url + gdk_path,
                wrk_post_script(scripts / "generate.lua", {"key_spec": "AES_256"}, admin),
                seconds,
                warmup,
            ),
        ]
    finally:
        cleanup.unwind(mark)  # stop this engine's server and database before the next engine runs

    figures: list[dict[str, Any]] = []
    for r in runs:
        report(engine, r, ref)
        is_sqlite_decrypt = engine == "sqlite" and r.op == "decrypt"
        figures += [
            figure(
                f"{r.op}_ops_per_s_{engine}",
                r.wrk.rps,
                "ops/s",
                ref.ops(r.op),
                target=TARGET_DECRYPT_OPS if is_sqlite_decrypt else None,
            ),
            figure(f"{r.op}_p50_ms_{engine}", r.wrk.p50_ms, "ms", ref.ms_per_op(r.op), higher_is_better=False),
            figure(
                f"{r.op}_p99_ms_{engine}",
                r.wrk.p99_ms,
                "ms",
                ref.ms_per_op(r.op),
                target=TARGET_DECRYPT_P99_MS if is_sqlite_decrypt else None,
                higher_is_better=False,
            ),
        ]
    return figures


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under 60 s in all)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per wrk measurement (default 20, or 5 with --quick)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="server worker processes (server.workers; default: one per core)",
    )
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="comma-separated database engines to run (default: sqlite,postgresql)",
    )
    args = parser.parse_args(argv)
    check_engine_args(parser, args, ENGINES)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    warmup = 1.0 if args.quick else 3.0

    def work(cleanup: Cleanup) -> list[dict[str, Any]]:
        wrk_binary()
        cores = os.cpu_count() or 1
        say(
            f"{BENCH}: wrk -c {CONNECTIONS} -t {THREADS} --latency, {args.duration:g} s per measurement "
            f"(after {warmup:g} s warm-up), engines: {', '.join(args.engines)}"
        )
        say(
            f"{BENCH}: this machine has {cores} CPU core(s), shared by wrk (the client), the keysteward server "
            f"and PostgreSQL: server figures are lower than on a machine of its own"
        )
        say(f"{BENCH}: before the run, other processes kept {background_load():.0%} of the machine busy")
        ref = measure_reference(0.5 if args.quick else 2.0)
        say(
            f"reference (in-process AES-256-GCM, 1 thread): decrypt {ref.decrypt_ops:,.0f} ops/s "
            f"({ref.ms_per_op('decrypt') * 1000:.2f} us/op), generate-data-key {ref.generate_ops:,.0f} ops/s "
            f"({ref.ms_per_op('generate_data_key') * 1000:.2f} us/op)"
        )
        figures: list[dict[str, Any]] = []
        for engine in args.engines:
            figures += run_engine(engine, cleanup, ref, args.duration, warmup, args.workers)
        return figures

    return run_bench(BENCH, work, (36, 6))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
