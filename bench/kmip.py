"""KMIP throughput and latency: keysteward's KMIP listener against PyKMIP's own server, same client, same run.

    python bench/kmip.py [--quick] [--duration S] [--python-client]

A real ``keysteward server start`` (SQLite, dev seal) with its KMIP listener, and ``pykmip-server`` (the
demonstration server users compare against) with the same server certificate and the same client CA; the
client is a hypervisor certificate of the keysteward tenant's CA. Both servers get the same client, 16
concurrent connections, for each of:

* vSphere-style: a new TLS connection for every operation, Create, Get, Activate, GetAttributes in turn
  (``kmip_new_conn_ops_per_s``, its p99; target: at least 5x PyKMIP's server and at least 500 ops/s);
* persistent connections: Get of a key per client (``kmip_get_per_s``, ``kmip_get_p99_ms``; targets
  2,000 Get/s and p99 under 20 ms on SQLite);
* persistent connections: Encrypt (AES-256-CBC, PKCS#5, 64 bytes) with an Active key (``kmip_encrypt_per_s``).

The client is bench/kmip_load.c, a small C load generator (OpenSSL, 16 pthreads, TLS 1.2, requests encoded
once), compiled at run time into a cache directory and checked byte for byte against keysteward's TTLV codec
first (bench/_kmip_load.py). It replaced a Python client (4 processes of 4 threads on keysteward's codec and
Python's ssl, still there with ``--python-client`` for comparison) because on a 2-core machine that client
took more than half the CPU (about 1.6 ms per new-connection operation, 1.2 cores at 900 Get/s), so the
figures measured the client. Each measurement also says where the CPU went: the server's and the client's
CPU per operation (from /proc and getrusage) and the share of other processes on the machine.

Each figure's ratio is keysteward's value over PyKMIP's server's, measured in the same run. The last line
is the machine-readable result: ``{"bench": "kmip", "figures": [{"name", "value", "unit", "reference",
"ratio", "target", "ok"}, ...]}`` (DESIGN.md section 7).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _kmip_load
from _common import (
    BenchError,
    Cleanup,
    KeystewardServer,
    children,
    children_cpu_seconds,
    free_port,
    machine_cpu,
    make_temp_dir,
    process_cpu_seconds,
    run_bench,
    say,
    stop_process,
)
from tests.support.kmip_client import KmipConn, Result, aes_256_template, batch_item, uid, wait_served

from keysteward.crypto import x509csr
from keysteward.formats import kmip_ttlv as t

BENCH = "kmip"
PROCESSES, THREADS = 4, 4  # the Python client's (--python-client)
VERSION = (1, 2)  # the KMIP protocol version both clients send


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _context(files: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # PyKMIP's server speaks TLS 1.2; both get the same
    ctx.load_verify_locations(files["server_ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(files["cert"], files["key"])
    return ctx


SUCCESS = bytes.fromhex("42007f05000000040000000000000000")
"""A batch item's Result Status Success, as it is encoded: what a lean client checks in each response."""


def _client(mode: str, port: int, files: dict[str, str], seconds: float, out: list[tuple[float, bool]]) -> None:
    ctx = _context(files)
    deadline = time.monotonic() + seconds
    if mode in ("persistent", "encrypt"):
        with KmipConn(port, ctx, version=(1, 2)) as conn:
            key = conn.one("Create", *aes_256_template()).uid()
            ask: tuple[Any, ...] = (uid(key),)
            if mode == "encrypt":
                conn.one("Activate", uid(key))
                params = t.struct_(
                    "CryptographicParameters",
                    t.enumeration("BlockCipherMode", 1),
                    t.enumeration("PaddingMethod", 3),
                    t.enumeration("CryptographicAlgorithm", 3),
                )
                ask = (uid(key), params, t.byte_string("Data", bytes(64)))  # fmt: skip
            operation = "Encrypt" if mode == "encrypt" else "Get"
            # the same request each time, encoded once, as a load generator sends it; the first answer is
            # decoded and checked whole, every later one must be a Success of the same length
            request = conn.encode(batch_item(operation, *ask))
            first = conn.send_raw(request)
            if not Result(t.decode(first).all("BatchItem")[0]).ok:
                out.append((0.0, False))
                return
            while time.monotonic() < deadline:
                started = time.perf_counter()
                answer = conn.send_raw(request)
                out.append((time.perf_counter() - started, len(answer) == len(first) and SUCCESS in answer))
        return
    session: ssl.SSLSession | None = None
    create = b""
    while time.monotonic() < deadline:
        key = ""
        for operation in ("Create", "Get", "Activate", "GetAttributes"):
            started = time.perf_counter()
            # a new connection for each operation, resuming the last TLS session as vCenter's Java TLS does;
            # requests encoded by the codec, answers checked for Success (the Create's decoded whole)
            with KmipConn(port, ctx, version=(1, 2), session=session if mode == "new" else None) as conn:
                if operation == "Create":
                    create = create or conn.encode(batch_item("Create", *aes_256_template()))
                    answer = conn.send_raw(create)
                    result = Result(t.decode(answer).all("BatchItem")[0])
                    key = result.uid() if result.ok else ""
                    ok = result.ok
                else:
                    ok = SUCCESS in conn.send_raw(conn.encode(batch_item(operation, uid(key))))
                session = conn.sock.session
            out.append((time.perf_counter() - started, ok))
            if not key:
                break


def _process(mode: str, port: int, files: dict[str, str], seconds: float) -> list[tuple[float, bool]]:
    out: list[tuple[float, bool]] = []
    threads = [threading.Thread(target=_client, args=(mode, port, files, seconds, out)) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def measure_python(mode: str, port: int, files: dict[str, str], seconds: float) -> tuple[int, float, float, float]:
    """The Python client: operations, seconds, p50 and p99 (ms) of 16 clients; any failure fails the run."""
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        parts = pool.starmap(_process, [(mode, port, files, seconds)] * PROCESSES)
    elapsed = time.monotonic() - started
    samples = [s for part in parts for s in part]
    failed = sum(1 for _, ok in samples if not ok)
    if failed or not samples:
        raise BenchError(f"{mode}: {failed} of {len(samples)} operations failed")
    latencies = [s for s, _ in samples]
    return len(samples), elapsed, 1000 * _percentile(latencies, 0.5), 1000 * _percentile(latencies, 0.99)


@dataclass
class Measured:
    rate: float  # operations per second
    p99: float  # ms
    line: str  # what it was and where the CPU went


def measure(
    client: Path | None, name: str, pid: int, mode: str, port: int, files: dict[str, str], seconds: float
) -> Measured:
    """One measurement of one server with the C client (``client``, the binary) or the Python one (None)."""
    server_pids = [pid, *children(pid)]  # keysteward's supervisor and its workers; pykmip-server's one process
    server0, client0, (busy0, total0) = process_cpu_seconds(server_pids), children_cpu_seconds(), machine_cpu()
    if client is None:
        ops, elapsed, p50, p99 = measure_python(mode, port, files, seconds)
        resumed = ""
    else:
        r = _kmip_load.run(client, mode, port, files, seconds, VERSION)
        if r.failures or not r.ops:
            raise BenchError(f"{name} {mode}: {r.failures} of {r.ops + r.failures} operations failed, "
                             f"{r.failed_by}; the first: {r.first_failure}")  # fmt: skip
        ops, elapsed, p50, p99 = r.ops, r.seconds, r.p50_ms, r.p99_ms
        resumed = f"; TLS sessions resumed: {r.resumed / ops:.0%}" if mode == "new" else ""
    busy1, total1 = machine_cpu()
    server_cpu = process_cpu_seconds(server_pids) - server0
    client_cpu = children_cpu_seconds() - client0  # the binary, or the Python client's pool processes
    cores = os.cpu_count() or 1
    busy = (busy1 - busy0) / max(1.0, total1 - total0)
    others = max(0.0, busy * cores - (server_cpu + client_cpu) / elapsed)
    line = (f"  {name:<13} {mode:<10} {ops / elapsed:7.0f} op/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms;  CPU per op: "
            f"server {1000 * server_cpu / ops:.2f} ms ({server_cpu / elapsed:.0%} of a core), client "
            f"{1000 * client_cpu / ops:.2f} ms ({client_cpu / elapsed:.0%}); others {others:.0%}, "
            f"machine {busy:.0%} busy{resumed}")  # fmt: skip
    return Measured(ops / elapsed, p99, line)


def start_pykmip(cleanup: Cleanup, work: Path, files: dict[str, str]) -> tuple[int, int]:
    """pykmip-server on a free port: (port, pid)."""
    port = free_port()
    (work / "policies").mkdir()
    config = work / "server.conf"
    config.write_text(
        "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={cert}\nkey_path={key}\nca_path={ca}\n"
        "auth_suite=TLS1.2\npolicy_path={policies}\nenable_tls_client_auth=True\nlogging_level=WARNING\n"
        "database_path={db}\n".format(port=port, cert=files["server_cert"], key=files["server_key"],
                                      ca=files["tenant_ca"], policies=work / "policies", db=work / "pykmip.db")
    )  # fmt: skip
    binary = Path(sys.executable).with_name("pykmip-server")
    if not binary.exists():
        raise BenchError("no pykmip-server: run `bash scripts/bootstrap.sh` (pykmip is a test dependency)")
    log = (work / "pykmip.log").open("wb")
    proc = subprocess.Popen([str(binary), "-f", str(config), "-l", str(work / "pykmip-server.log")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    cleanup.push(f"stop pykmip-server {proc.pid}", lambda: stop_process(proc))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with KmipConn(port, _context(files)) as conn:
                if conn.one("DiscoverVersions").ok:
                    return port, proc.pid
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise BenchError(f"pykmip-server exited: {(work / 'pykmip.log').read_text()[-2000:]}")
    raise BenchError("pykmip-server did not answer within 30 s")


def wait_trusted(port: int, files: dict[str, str]) -> None:
    """Until every keysteward worker serves the client (:func:`tests.support.kmip_client.wait_served`)."""
    if not wait_served(port, _context(files), 30):
        raise BenchError("the keysteward KMIP listener did not accept the client within 30 s")


def work(args: argparse.Namespace) -> Any:
    def run(cleanup: Cleanup) -> list[dict[str, Any]]:
        kmip_port = free_port()
        server = KeystewardServer.init(cleanup)
        server.start(cleanup, workers=args.workers, env={"KEYSTEWARD_KMIP_LISTEN": f"127.0.0.1:{kmip_port}"})
        admin = server.post_ok("/v1/tenants", {"name": "bench"}, server.root_token)["admin_token"]["token"]
        ca_pem = server.post_ok("/v1/ca/init", {}, admin)["cert_pem"]
        key_pem, csr = x509csr.make_csr("bench", "hypervisor", "esx-bench")
        issued = server.post_ok("/v1/ca/issue", {"name": "esx-bench", "role": "hypervisor",
                                                 "csr_pem": csr.decode()}, admin)  # fmt: skip
        scratch = make_temp_dir(cleanup, "ks-bench-kmip-")
        tls = server.data_dir / "tls"
        files = {"cert": str(scratch / "client.pem"), "key": str(scratch / "client.key"),
                 "server_ca": server.ca_file, "tenant_ca": str(scratch / "tenant-ca.pem"),
                 "server_cert": str(tls / "server.pem"), "server_key": str(tls / "server.key")}  # fmt: skip
        Path(files["cert"]).write_text(issued["cert_pem"])
        Path(files["key"]).write_bytes(bytes(key_pem))
        Path(files["tenant_ca"]).write_text(ca_pem)
        pykmip_port, pykmip_pid = start_pykmip(cleanup, scratch, files)
        wait_trusted(kmip_port, files)
        client: Path | None = None
        if not args.python_client:
            client = _kmip_load.build()
            _kmip_load.verify(client, VERSION)
        say(f"{BENCH}: client {'Python (4 processes x 4 threads)' if client is None else client}, "
            f"{args.duration:g} s per measurement, {os.cpu_count()} cores shared by client and server")  # fmt: skip
        assert server.proc is not None
        ks_pid = server.proc.pid
        results: dict[tuple[str, str], Measured] = {}
        for mode in ("new", "persistent", "encrypt"):
            for name, port, pid in (("keysteward", kmip_port, ks_pid), ("pykmip-server", pykmip_port, pykmip_pid)):
                m = measure(client, name, pid, mode, port, files, args.duration)
                say(m.line)
                results[name, mode] = m
        ks_new, ks_new_p99 = results["keysteward", "new"].rate, results["keysteward", "new"].p99
        py_new, py_new_p99 = results["pykmip-server", "new"].rate, results["pykmip-server", "new"].p99
        ks_get, ks_get_p99 = results["keysteward", "persistent"].rate, results["keysteward", "persistent"].p99
        py_get, py_get_p99 = results["pykmip-server", "persistent"].rate, results["pykmip-server", "persistent"].p99
        ks_enc, py_enc = results["keysteward", "encrypt"].rate, results["pykmip-server", "encrypt"].rate
        figures: list[dict[str, Any]] = []
        ratio = ks_new / py_new if py_new else 0.0
        figures.append({"name": "kmip_new_conn_ops_per_s", "value": round(ks_new, 1), "unit": "op/s",
                        "reference": round(py_new, 1), "ratio": round(ratio, 3), "target": 5.0,
                        "ok": ratio >= 5.0 and ks_new >= 500})  # fmt: skip
        figures.append({"name": "kmip_new_conn_p99_ms", "value": round(ks_new_p99, 2), "unit": "ms",
                        "reference": round(py_new_p99, 2), "ratio": round(ks_new_p99 / py_new_p99, 3) if py_new_p99
                        else None, "target": None, "ok": None})  # fmt: skip
        figures.append({"name": "kmip_get_per_s", "value": round(ks_get, 1), "unit": "op/s",
                        "reference": round(py_get, 1), "ratio": round(ks_get / py_get, 3) if py_get else None,
                        "target": 2000.0, "ok": ks_get >= 2000})  # fmt: skip
        figures.append({"name": "kmip_get_p99_ms", "value": round(ks_get_p99, 2), "unit": "ms",
                        "reference": round(py_get_p99, 2), "ratio": round(ks_get_p99 / py_get_p99, 3) if py_get_p99
                        else None, "target": 20.0, "ok": ks_get_p99 <= 20})  # fmt: skip
        figures.append({"name": "kmip_encrypt_per_s", "value": round(ks_enc, 1), "unit": "op/s",
                        "reference": round(py_enc, 1), "ratio": round(ks_enc / py_enc, 3) if py_enc else None,
                        "target": None, "ok": None})  # fmt: skip
        return figures

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="5 s per measurement instead of 20")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="keysteward server worker processes")
    parser.add_argument(
        "--python-client", action="store_true", help="the Python client (4 processes x 4 threads), not kmip_load.c"
    )
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 5.0 if args.quick else 20.0
    return run_bench(BENCH, work(args))


if __name__ == "__main__":
    sys.exit(main())
