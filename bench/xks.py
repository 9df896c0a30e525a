"""XKS proxy encrypt and decrypt through the real HTTPS listener with SigV4, against in-process AES-GCM.

    python bench/xks.py [--quick] [--duration S] [--engines sqlite,postgresql] [--connections 64]

For each engine it initialises and starts a real ``keysteward`` server with the XKS listener
(``KEYSTEWARD_XKS_LISTEN``; dev seal, TLS), creates a tenant, an external key store, an external key
and a policy that permits the store's CloudService, and drives the listener with ``wrk`` (64
connections, 2 threads) with

* ``POST {prefix}/kms/xks/v1/keys/bench-key/encrypt``: 4 KiB plaintext, 1 KiB AAD, and
* ``POST {prefix}/kms/xks/v1/keys/bench-key/decrypt`` of a ciphertext made beforehand (same AAD).

Each call is signed by botocore's ``SigV4Auth`` (service ``kms-xks-proxy``) just before its wrk run:
6,000 calls per operation, each with its own ``kmsRequestId`` (as KMS sends them), which the wrk threads
send in turn (:data:`REQUESTS_LUA`). Within the 5-minute skew window the server verifies every call in
full (botocore canonicalisation, HMAC chain, constant-time compare), builds its Cedar facts (a call's id is
back only seconds later, so never from the cache of the facts of the same second), decides it with the
tenant's Cedar policy and writes its audit record. The store's quota is lifted for the run
(``KEYSTEWARD_XKS_QUOTA_TPS``), so the figure is the capacity.

The reference, measured in the same run, is the same AES-256-GCM (4 KiB, the spec's framed 1 KiB AAD)
in-process on one thread: the ceiling without HTTP, TLS, SigV4, policy, database or audit.
``ratio`` = server ops/s / reference ops/s; for p99 the reference is the in-process time per operation.
AWS KMS gives a proxy 250 ms per call and asks for a round trip under 35 ms; its default quota is
1,800 TPS per key store. Each operation is measured twice:

* saturating: 64 connections that never wait, for the capacity (``xks_ops_per_s_<engine>``, both
  operations) and the tail at capacity (``xks_saturated_p99_ms_<engine>``). By Little's law their mean
  latency is 64 / throughput (35.6 ms at 1,800 ops/s), so that tail says how deep the queue is, not how
  long a call takes;
* paced: requests leave on a schedule of ``--sqlite-rate`` (1,800) or ``--pg-rate`` (1,000) per second in
  all (:data:`PACED_LUA`, an open loop as KMS's calls arrive), and ``xks_p99_ms_<engine>`` is the worse
  operation's p99 there, the issue's "p99 under 35 ms" at its rate; ``xks_paced_ops_per_s_<engine>`` is the
  rate reached.

The last line is ``{"bench": "xks", "figures": [...]}`` with ``xks_ops_per_s_<engine>`` (encrypt and
decrypt together) and ``xks_p99_ms_<engine>`` (the worse of the two), plus per-operation figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _common import (
    BenchError,
    Cleanup,
    WrkMeasurement,
    background_load,
    check_engine_args,
    cpu_line,
    engine_server,
    figure,
    free_port,
    lua_string,
    make_temp_dir,
    measure_wrk,
    run_bench,
    say,
    wrk_binary,
)

BENCH = "xks"
ENGINES = ("sqlite", "postgresql")
THREADS = 2
REGION = "us-east-1"
PREFIX = "bench"
KEY = "bench-key"
PLAINTEXT, AAD = os.urandom(4096), os.urandom(1024)
TARGET_OPS_SQLITE = 1800.0
PACE_KEPT = 0.99
"""The paced run kept its schedule when it reached this share of the asked rate (wrk's start and end cost a few
calls: 1,796 of 1,800 ops/s is the schedule kept, not a miss)."""
TARGET_P99_MS = 35.0
POLICY = """
@id("bench-kms")
permit (principal is Keysteward::CloudService,
        action in [Keysteward::Action::"encrypt", Keysteward::Action::"decrypt"], resource);
"""


def measure_reference(seconds: float) -> tuple[float, float]:
    """(encrypt ops/s, decrypt ops/s) of the server's AES-256-GCM work, in-process, one thread."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = AESGCM(os.urandom(32))
    framed = len(AAD).to_bytes(2, "big") + AAD + b"\x07ks1\x00\x00\x00\x01"
    nonce = os.urandom(12)
    sealed = key.encrypt(nonce, PLAINTEXT, framed)

    def rate(fn: Any) -> float:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(500):
                fn()
            count += 500
        return count / (time.perf_counter() - start)

    return rate(lambda: key.encrypt(os.urandom(12), PLAINTEXT, framed)), rate(
        lambda: key.decrypt(nonce, sealed, framed)
    )


PACED_LUA = """
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } ks_timespec; int clock_gettime(int, ks_timespec *); ]]
local now_ts = ffi.new("ks_timespec")
local interval_ms = %(interval).6f
local next_ms = nil
local function now_ms()
    ffi.C.clock_gettime(1, now_ts)  -- CLOCK_MONOTONIC
    return tonumber(now_ts.tv_sec) * 1000.0 + tonumber(now_ts.tv_nsec) / 1e6
end
function delay()
    local now = now_ms()
    if next_ms == nil or next_ms < now - 1000.0 then next_ms = now end
    local slot = next_ms
    next_ms = next_ms + interval_ms
    if slot <= now then return 0 end
    return slot - now
end
"""
"""A wrk thread's schedule: each request takes the thread's next slot (one every ``interval_ms``) and its
connection waits for it. The rate holds however long the answers take, as long as a connection is free
(an open loop, as the cloud's calls arrive); a server that falls behind more than a second is not sent a
burst to catch up. LuaJIT (wrk's Lua) reads the monotonic clock through its FFI."""


CALLS_PER_OP = 6000
"""Distinct signed calls per operation (each with its own kmsRequestId), sent in turn by the wrk threads.
At about 2,000 calls/s a call's id comes back after 3 s or more: a call's Cedar facts, which the server
keeps within their second for the same id, are never an earlier call's (as with KMS, whose ids are unique)."""

REQUESTS_LUA = """
local calls_file = %(file)s
local nthreads = %(threads)d
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  calls = {}
  local i = 0
  for line in io.lines(calls_file) do
    if i %% nthreads == id then calls[#calls + 1] = line end
    i = i + 1
  end
  turn = 0
end
function request()
  turn = turn %% #calls + 1
  local auth, date, body = string.match(calls[turn], "^([^\t]*)\t([^\t]*)\t(.*)$")
  local headers = {}
  for k, v in pairs(wrk.headers) do headers[k] = v end
  headers["Authorization"] = auth
  headers["X-Amz-Date"] = date
  return wrk.format("POST", nil, headers, body)
end
"""
"""Each wrk thread sends its share of the calls file in turn: one signed call per line (Authorization,
x-amz-date and the body, tab-separated); the other headers are the same for all."""


def signed_script(
    path: Path, url: str, body: dict[str, Any], akid: str, secret: str, rate: float | None = None
) -> Path:
    """A wrk script sending :data:`CALLS_PER_OP` botocore-signed calls in turn (valid for the 5-minute skew
    window), ``body`` with a fresh ``kmsRequestId`` each; with ``rate`` the calls leave on a schedule of
    that many per second in all (:data:`PACED_LUA`), not as fast as the answers come."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    # wrk's own Host header leaves the port out: name it here, and sign what is sent
    common = {"Content-Type": "application/json", "Host": urlsplit(url).netloc}
    signer = SigV4Auth(Credentials(akid, secret), "kms-xks-proxy", REGION)
    calls = path.with_suffix(".calls")
    with calls.open("w") as out:
        for _ in range(CALLS_PER_OP):
            call = {**body, "requestMetadata": {**body["requestMetadata"], "kmsRequestId": str(uuid.uuid4())}}
            data = json.dumps(call, separators=(",", ":"))
            request = AWSRequest(method="POST", url=url, data=data.encode(), headers=dict(common))
            signer.add_auth(request)
            out.write(f"{request.headers['Authorization']}\t{request.headers['X-Amz-Date']}\t{data}\n")
    lines = ['wrk.method = "POST"']
    lines += [f"wrk.headers[ {lua_string(k)} ] = {lua_string(v)}" for k, v in common.items()]
    lines.append(REQUESTS_LUA % {"file": lua_string(str(calls)), "threads": THREADS})
    if rate is not None:
        lines.append(PACED_LUA % {"interval": THREADS * 1000.0 / rate})
    path.write_text("\n".join(lines) + "\n")
    return path


def xks_call(url: str, body: dict[str, Any], akid: str, secret: str, ca_file: str) -> dict[str, Any]:
    import ssl
    import urllib.request

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    data = json.dumps(body).encode()
    request = AWSRequest(method="POST", url=url, data=data, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(akid, secret), "kms-xks-proxy", REGION).add_auth(request)
    req = urllib.request.Request(url, data=data, method="POST", headers=dict(request.headers.items()))  # noqa: S310
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=ca_file), timeout=30) as resp:  # noqa: S310
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


def metadata(operation: str) -> dict[str, str]:
    return {
        "awsPrincipalArn": "arn:aws:iam::123456789012:role/bench",
        "kmsKeyArn": "arn:aws:kms:us-east-1:1:key/b",
        "kmsOperation": operation,
        "kmsRequestId": "bench",
        "kmsViaService": "ebs",
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run_engine(
    engine: str, cleanup: Cleanup, ref: tuple[float, float], args: argparse.Namespace
) -> list[dict[str, Any]]:
    mark = cleanup.mark()
    warmup = 1.0 if args.quick else 3.0
    server: Any = None
    try:
        port = free_port()
        env = {"KEYSTEWARD_XKS_LISTEN": f"127.0.0.1:{port}", "KEYSTEWARD_XKS_QUOTA_TPS": "1000000"}
        server, pg = engine_server(cleanup, engine, workers=args.workers, env=env)
        admin = server.cli(["tenant", "create", "acme", "--json"], token=server.root_token)["admin_token"]["token"]
        store = server.cli(["xks", "store", "create", PREFIX, "--region", REGION, "--json"], token=admin)
        server.cli(["xks", "key", "create", KEY, "--store", PREFIX, "--json"], token=admin)
        status, answer = server.request("PUT", "/v1/policy", {"sources": {"bench.cedar": POLICY}}, admin)
        if status != 200:
            raise BenchError(f"the policy was refused: {answer}")
        akid, secret = store["access_key_id"], store["secret_access_key"]
        base = f"https://127.0.0.1:{port}/{PREFIX}/kms/xks/v1/keys/{KEY}"
        enc_body = {
            "requestMetadata": metadata("GenerateDataKey"),
            "plaintext": b64(PLAINTEXT),
            "additionalAuthenticatedData": b64(AAD),
            "encryptionAlgorithm": "AES_GCM",
        }
        sealed = xks_call(base + "/encrypt", enc_body, akid, secret, server.ca_file)
        dec_body = {
            "requestMetadata": metadata("Decrypt"),
            "additionalAuthenticatedData": b64(AAD),
            "encryptionAlgorithm": "AES_GCM",
            **sealed,
        }
        if (
            base64.b64decode(xks_call(base + "/decrypt", dec_body, akid, secret, server.ca_file)["plaintext"])
            != PLAINTEXT
        ):
            raise BenchError("decrypt did not give back the plaintext")
        say(f"[{engine}] keysteward XKS listener 127.0.0.1:{port}, store /{PREFIX}, key {KEY}, policy in force")
        scripts = make_temp_dir(cleanup, "ks-bench-xks-")
        runs: list[WrkMeasurement] = []
        paced: list[WrkMeasurement] = []

        def measure(op: str, script: Path) -> WrkMeasurement:
            return measure_wrk(server, pg, op, f"{base}/{op}", script, args.duration, warmup=warmup,
                               connections=args.connections, threads=THREADS)  # fmt: skip

        rate = args.pg_rate if engine == "postgresql" else args.sqlite_rate
        for op, body in (("encrypt", enc_body), ("decrypt", dec_body)):
            if rate > 0:  # p99 at the rate (1,000 ops/s on PostgreSQL, 1,800 on SQLite), on a schedule
                paced.append(
                    measure(op, signed_script(scripts / f"{op}-paced.lua", f"{base}/{op}", body, akid, secret, rate))
                )
            runs.append(measure(op, signed_script(scripts / f"{op}.lua", f"{base}/{op}", body, akid, secret)))
    except BenchError:
        cleanup.failed = True  # before the unwind below removes the server log: print its warnings first
        if server is not None:
            say(failed_outcomes(server))
        raise
    finally:
        cleanup.unwind(mark)
    figures: list[dict[str, Any]] = []
    for r, ref_ops in zip(runs, ref, strict=True):
        w = r.wrk
        say(
            f"[{engine}] {r.op}: {w.rps:,.1f} ops/s  p50 {w.p50_ms:.2f} ms  p90 {w.p90_ms:.2f} ms  "
            f"p99 {w.p99_ms:.2f} ms  ({w.requests} requests, 0 non-2xx)"
        )
        say(cpu_line(engine, r))
        figures += [
            figure(f"xks_{r.op}_ops_per_s_{engine}", w.rps, "ops/s", ref_ops),
            figure(f"xks_{r.op}_p99_ms_{engine}", w.p99_ms, "ms", 1000.0 / ref_ops, higher_is_better=False),
        ]
    # both operations, as the cloud mixes them: total work over total time, the worse tail
    seconds = sum(r.wrk.seconds for r in runs)
    ops = sum(r.wrk.requests for r in runs) / seconds
    ref_ops = 2.0 / sum(1.0 / x for x in ref)
    saturated_p99 = max(r.wrk.p99_ms for r in runs)
    figures += [
        figure(
            f"xks_ops_per_s_{engine}", ops, "ops/s", ref_ops, target=TARGET_OPS_SQLITE if engine == "sqlite" else None
        ),
        figure(f"xks_saturated_p99_ms_{engine}", saturated_p99, "ms", 1000.0 / ref_ops, higher_is_better=False),
    ]
    for r in paced:
        w = r.wrk
        say(
            f"[{engine}] {r.op} paced at {rate:g} ops/s: reached {w.rps:,.1f} ops/s  p50 {w.p50_ms:.2f} ms  "
            f"p99 {w.p99_ms:.2f} ms"
        )
        say(cpu_line(engine, r))
    if paced:  # the tail: at its rate (1,800 ops/s on SQLite, 1,000 on PostgreSQL), the worse operation
        figures += [
            figure(
                f"xks_paced_ops_per_s_{engine}",
                min(r.wrk.rps for r in paced),
                "ops/s",
                ref_ops,
                target=rate * PACE_KEPT,
            ),
            figure(
                f"xks_p99_ms_{engine}",
                max(r.wrk.p99_ms for r in paced),
                "ms",
                1000.0 / ref_ops,
                target=TARGET_P99_MS,
                higher_is_better=False,
            ),
        ]
    return figures


def failed_outcomes(server: Any) -> str:
    """The XKS calls that did not answer ok, by operation and error name, as the workers that answer a few
    /metrics requests count them (each worker keeps its own counts)."""
    seen: dict[tuple[str, str], float] = {}
    for _ in range(8):
        req = urllib.request.Request(server.url + "/metrics")  # noqa: S310 - our https URL
        try:
            with urllib.request.urlopen(req, context=server._ssl, timeout=10) as resp:  # noqa: S310
                text = resp.read().decode()
        except OSError as exc:
            return f"xks: the server's /metrics could not be read ({exc})"
        for op, outcome, count in re.findall(
            r'^keysteward_xks_request_seconds_count\{operation="([^"]+)",outcome="([^"]+)"\} (\S+)$', text, re.MULTILINE
        ):
            if outcome != "ok":
                seen[(op, outcome)] = max(seen.get((op, outcome), 0.0), float(count))
    listed = ", ".join(f"{op} {outcome}: {count:.0f}" for (op, outcome), count in sorted(seen.items()))
    return f"xks: calls not answered ok, as the workers reached count them: {listed or 'none counted'}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under 60 s in all)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk run (default 20, 5 with --quick)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients (wrk connections)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="sqlite,postgresql (default both)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server worker processes")
    parser.add_argument("--pg-rate", type=float, default=1000.0, help="ops/s of the paced PostgreSQL p99 run")
    parser.add_argument("--sqlite-rate", type=float, default=1800.0, help="ops/s of the paced SQLite p99 run")
    args = parser.parse_args(argv)
    check_engine_args(parser, args, ENGINES)
    if args.pg_rate <= 0 or args.sqlite_rate <= 0:
        parser.error("--pg-rate and --sqlite-rate must be above 0 (the p99 figures are measured at them)")
    if args.quick and args.engines == list(ENGINES):
        args.engines = ["sqlite"]  # one engine keeps --quick under a minute
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def work(cleanup: Cleanup) -> list[dict[str, Any]]:
        wrk_binary()
        say(
            f"{BENCH}: wrk -c {args.connections} -t {THREADS}, {args.duration:g} s per operation, "
            f"engines: {', '.join(args.engines)}; {os.cpu_count()} CPU core(s) shared by wrk, the server "
            f"and PostgreSQL"
        )
        say(f"{BENCH}: before the run, other processes kept {background_load():.0%} of the machine busy")
        ref = measure_reference(0.5 if args.quick else 2.0)
        say(
            f"reference (in-process AES-256-GCM, 4 KiB + 1 KiB AAD, 1 thread): encrypt {ref[0]:,.0f} ops/s, "
            f"decrypt {ref[1]:,.0f} ops/s"
        )
        figures: list[dict[str, Any]] = []
        for engine in args.engines:
            figures += run_engine(engine, cleanup, ref, args)
        return figures

    return run_bench(BENCH, work, (34, 6))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
