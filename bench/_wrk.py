"""wrk runs for the benches: Lua scripts (a string literal, a POST with a bearer token), running wrk and
reading its output, one measured run with the CPU it cost, and the line that says where that CPU went.
Every name here is importable from bench/_common.py too.

Not a bench itself: the benches that use it (through bench/_common.py) end with their
``{"bench": NAME, "figures": [...]}`` line (:func:`_common.run_bench`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _cleanup import BenchError
from _cpu import children, children_cpu_seconds, machine_cpu, process_cpu_seconds
from _server import KeystewardServer, PgCluster

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def lua_string(text: str) -> str:
    level = "=" * 4
    while f"]{level}]" in text:
        level += "="
    return f"[{level}[{text}]{level}]"


def wrk_post_script(path: Path, body: Any, token: str) -> Path:
    """A wrk Lua script that POSTs ``body`` (JSON) with a bearer token on every request."""
    path.write_text(
        f'wrk.method = "POST"\n'
        f"wrk.body = {lua_string(json.dumps(body, separators=(',', ':')))}\n"
        f'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = {lua_string("Bearer " + token)}\n'
    )
    return path


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    text: str


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        raise BenchError(f"cannot read wrk time {value!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    def need(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.MULTILINE)
        if not m:
            raise BenchError(f"wrk output has no match for {pattern!r}:\n{text}")
        return m

    latency = {p: _ms(need(rf"^\s+{p}%\s+(\S+)").group(1)) for p in ("50", "75", "90", "99")}
    done = need(r"^\s*(\d+) requests in ([\d.]+\w+),")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True)) if sock else {}
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2)) / 1000.0,
        rps=float(need(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=latency["50"],
        p75_ms=latency["75"],
        p90_ms=latency["90"],
        p99_ms=latency["99"],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors,
        text=text,
    )


def wrk_binary() -> str:
    found = shutil.which("wrk") or ("/usr/bin/wrk" if Path("/usr/bin/wrk").is_file() else None)
    if not found:
        raise BenchError("wrk is not installed: run `bash scripts/bootstrap.sh` (apt-get install wrk)")
    return found


def run_wrk(url: str, script: Path, seconds: float, *, connections: int = 16, threads: int = 2) -> WrkResult:
    """One wrk run; fails on any non-2xx answer or socket error (the figures would hide failures).

    ``--timeout`` is far above any expected latency: wrk leaves responses slower than its timeout
    out of the latency histogram, which would flatter p99.
    """
    args = [
        wrk_binary(),
        "-c",
        str(connections),
        "-t",
        str(threads),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "60s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()}\n{done.stdout}")
    result = parse_wrk(done.stdout)
    if result.requests == 0:
        raise BenchError(f"wrk completed no request against {url}:\n{done.stdout}")
    if result.non_2xx:
        raise BenchError(f"{result.non_2xx} of {result.requests} responses from {url} were not 2xx:\n{done.stdout}")
    if any(result.socket_errors.values()):
        raise BenchError(f"wrk saw socket errors against {url} {result.socket_errors}:\n{done.stdout}")
    return result


@dataclass
class WrkMeasurement:
    """One timed wrk run and where the machine's CPU went meanwhile."""

    op: str
    wrk: WrkResult
    server_cpu: float  # CPU seconds of the keysteward processes (supervisor and workers) during the run
    db_cpu: float  # CPU seconds of PostgreSQL processes (0 for SQLite: it runs inside the server)
    client_cpu: float  # CPU seconds of wrk
    machine_busy: float  # fraction of all cores busy


def measure_wrk(
    server: KeystewardServer,
    pg: PgCluster | None,
    op: str,
    url: str,
    script: Path,
    seconds: float,
    *,
    warmup: float,
    connections: int,
    threads: int,
) -> WrkMeasurement:
    """A warm-up run (skipped when ``warmup`` is 0), then the timed run with CPU accounting."""
    if warmup > 0:
        run_wrk(url, script, warmup, connections=connections, threads=threads)  # connections, caches warm
    assert server.proc is not None
    pg_pids = pg.pids() if pg else []
    server_pids = [server.proc.pid, *children(server.proc.pid)]  # the supervisor and its workers
    cpu0 = process_cpu_seconds(server_pids)
    db0 = process_cpu_seconds(pg_pids)
    wrk0 = children_cpu_seconds()
    busy0, total0 = machine_cpu()
    result = run_wrk(url, script, seconds, connections=connections, threads=threads)
    busy1, total1 = machine_cpu()
    pg_pids_after = sorted(set(pg_pids) | set(pg.pids() if pg else []))
    return WrkMeasurement(
        op=op,
        wrk=result,
        server_cpu=process_cpu_seconds(server_pids) - cpu0,
        db_cpu=max(0.0, process_cpu_seconds(pg_pids_after) - db0),
        client_cpu=children_cpu_seconds() - wrk0,
        machine_busy=(busy1 - busy0) / max(1.0, total1 - total0),
    )


def cpu_line(engine: str, r: WrkMeasurement, per: int = 0, what: str = "req") -> str:
    """Where the CPU went: server, PostgreSQL, wrk, other processes; ``per`` units (default: wrk's requests)."""
    w = r.wrk
    per_unit = 1000.0 / max(1, per or w.requests)
    cores = os.cpu_count() or 1
    db = (
        f", PostgreSQL {r.db_cpu / w.seconds:.0%} ({r.db_cpu * per_unit:.2f} ms/{what})"
        if engine == "postgresql"
        else ""
    )
    others = max(0.0, r.machine_busy * cores - (r.server_cpu + r.db_cpu + r.client_cpu) / w.seconds)
    return (
        f"[{engine}]   CPU of one core: server {r.server_cpu / w.seconds:.0%} ({r.server_cpu * per_unit:.2f} ms/{what})"
        f"{db}, wrk {r.client_cpu / w.seconds:.0%}, other processes {others:.0%}; "
        f"machine {r.machine_busy:.0%} busy of {cores} cores"
    )
