"""Shared helpers for the scripts under bench/: cleanup, a throw-away PostgreSQL cluster, a real
keysteward server process, wrk runs and their parsing, CPU accounting, and the closing JSON line.

Nothing here imports pytest or the test fixtures: a bench runs with the project's runtime
dependencies only (the PostgreSQL helper mirrors tests/fixtures/postgres.py).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench scripts share the tests' PostgreSQL helper

from tests.support import pgcluster  # noqa: E402


class BenchError(Exception):
    """The run cannot produce valid figures (a tool is missing, a server failed, a request failed)."""


def say(text: str = "") -> None:
    print(text, flush=True)


# -- cleanup ---------------------------------------------------------------------------------


class Cleanup:
    """LIFO cleanup callbacks, run once: from ``finally``, at interpreter exit, or on SIGTERM/SIGHUP."""

    def __init__(self) -> None:
        self._callbacks: list[tuple[str, Callable[[], None]]] = []
        self.failed = False
        """Set when the run failed: cleanups may then say what they hold (a server log's errors) first."""
        atexit.register(self.run)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    @staticmethod
    def _on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the caller's finally blocks

    def push(self, label: str, callback: Callable[[], None]) -> None:
        self._callbacks.append((label, callback))

    def mark(self) -> int:
        return len(self._callbacks)

    def unwind(self, mark: int) -> None:
        """Run (and forget) the callbacks pushed since ``mark``, newest first."""
        while len(self._callbacks) > mark:
            label, callback = self._callbacks.pop()
            try:
                callback()
            except BaseException as exc:  # keep cleaning up the rest, even after Ctrl-C
                print(f"cleanup: {label} failed: {exc!r}", file=sys.stderr, flush=True)

    def run(self) -> None:
        self.unwind(0)


def make_temp_dir(cleanup: Cleanup, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    cleanup.push(f"remove {path}", lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
    """SIGTERM the process we started (and its own session), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # started with start_new_session=True: the group is ours
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


# -- PostgreSQL ------------------------------------------------------------------------------


@dataclass
class PgCluster:
    """The tests' throw-away PostgreSQL cluster (tests/support/pgcluster.py), stopped by the bench's cleanup."""

    cluster: pgcluster.PgCluster

    @classmethod
    def start(cls, cleanup: Cleanup) -> PgCluster:
        try:
            cluster = pgcluster.start(prefix="ks-bench-pg-")
        except pgcluster.PgUnavailable as exc:
            raise BenchError(str(exc)) from exc
        cleanup.push("stop PostgreSQL", cluster.stop)
        return cls(cluster)

    @property
    def port(self) -> int:
        return self.cluster.port

    def create_database(self, name: str) -> str:
        return self.cluster.create_database(name)

    def pids(self) -> list[int]:
        """The postmaster and all its children (backends, background workers)."""
        try:
            master = int((self.cluster.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [master, *children(master)]


# -- keysteward server -----------------------------------------------------------------------


def keysteward_cli() -> list[str]:
    for candidate in (Path(sys.executable).with_name("keysteward"), REPO / ".venv" / "bin" / "keysteward"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    found = shutil.which("keysteward")
    if found:
        return [found]
    raise BenchError("no `keysteward` command: run `bash scripts/bootstrap.sh` and use .venv/bin/python")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus any KEYSTEWARD_* the caller had (they would reconfigure our server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTEWARD_")}
    env.update(extra)
    return env


@dataclass
class KeystewardServer:
    """``keysteward server init`` + ``server start`` in a data directory of its own, over HTTPS."""

    data_dir: Path
    port: int
    url: str = ""
    ca_file: str = ""
    root_token: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    _ssl: ssl.SSLContext | None = None

    @classmethod
    def init(cls, cleanup: Cleanup, *, database_url: str = "") -> KeystewardServer:
        data_dir = make_temp_dir(cleanup, "ks-bench-data-")
        server = cls(data_dir=data_dir, port=free_port(), log_path=data_dir.parent / f"{data_dir.name}.log")
        cleanup.push(f"remove {server.log_path}", lambda: server.forget_log(cleanup.failed))
        args = ["server", "init", "--seal", "dev", "--insecure-dev-seal", "--listen-port", str(server.port), "--json"]
        if database_url:
            args += ["--database-url", database_url]
        out = server.cli(args)
        server.url, server.ca_file, server.root_token = out["url"], out["ca_file"], out["root_token"]
        server._ssl = ssl.create_default_context(cafile=server.ca_file)
        return server

    def cli(self, args: list[str], token: str = "") -> Any:
        env = _clean_env(KEYSTEWARD_DATA_DIR=str(self.data_dir), **({"KEYSTEWARD_TOKEN": token} if token else {}))
        done = subprocess.run(
            [*keysteward_cli(), *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"keysteward {' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout)

    def start(
        self, cleanup: Cleanup, timeout: float = 60.0, workers: int = 1, env: dict[str, str] | None = None
    ) -> None:
        """Start the server; ``env`` adds ``KEYSTEWARD_*`` overrides (e.g. ``KEYSTEWARD_RELEASE_NONCE_TTL_SECONDS``)."""
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*keysteward_cli(), "server", "start"],
            env=_clean_env(
                **(env or {}), KEYSTEWARD_DATA_DIR=str(self.data_dir), KEYSTEWARD_SERVER_WORKERS=str(workers)
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        cleanup.push(f"stop keysteward server {self.proc.pid}", self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"keysteward server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.request("GET", "/v1/health")
                if status == 200 and not body.get("sealed", True):
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise BenchError(f"keysteward server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def forget_log(self, failed: bool) -> None:
        """Remove the server log; after a failed run first print its warnings and errors (the cause of a
        non-2xx answer wrk cannot show)."""
        if failed:
            try:
                text = self.log_path.read_text(errors="replace")
            except OSError:
                text = ""
            noted = [line for line in text.splitlines() if '"level": "warning"' in line or '"level": "error"' in line]
            for line in noted[-40:]:
                print(f"server log: {line[:500]}", file=sys.stderr, flush=True)
        self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def request(self, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        if not self.url.startswith("https://"):
            raise BenchError(f"unexpected server URL {self.url!r}")
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 - https only
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=30) as resp:  # noqa: S310 - our https URL
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def post_ok(self, path: str, body: Any, token: str) -> Any:
        status, answer = self.request("POST", path, body, token)
        if status >= 300:
            raise BenchError(f"POST {path} answered {status}: {answer}")
        return answer


# -- CPU accounting --------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def process_cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of live processes (exited ones no longer count)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return float(total - idle), float(total)


def background_load(seconds: float = 0.5) -> float:
    """The share of the machine other processes keep busy, sampled over ``seconds`` before a run."""
    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / max(1.0, total1 - total0)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- wrk -------------------------------------------------------------------------------------

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


# -- figures ---------------------------------------------------------------------------------


def figure(
    name: str,
    value: float,
    unit: str,
    reference: float,
    *,
    target: float | None = None,
    higher_is_better: bool = True,
    digits: int = 3,
) -> dict[str, Any]:
    """One figure; ratio = value / reference; ok is None when the figure has no target."""
    ok = None if target is None else (value >= target if higher_is_better else value <= target)
    return {
        "name": name,
        "value": round(value, digits),
        "unit": unit,
        "reference": float(f"{reference:.6g}"),
        "ratio": float(f"{value / reference:.4g}") if reference else None,
        "target": target,
        "ok": ok,
    }


def ratio_figure(name: str, value: float, unit: str, reference: float, target: float | None) -> dict[str, Any]:
    """One figure whose target applies to the ratio value / reference (ok is None without a target)."""
    ratio = value / reference if reference else 0.0
    return {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "reference": round(reference, 3),
        "ratio": round(ratio, 3),
        "target": target,
        "ok": None if target is None else ratio >= target,
    }


def engine_server(
    cleanup: Cleanup, engine: str, *, workers: int, env: dict[str, str] | None = None
) -> tuple[KeystewardServer, PgCluster | None]:
    """A started keysteward server on ``engine``: its SQLite file, or a throw-away PostgreSQL 15 cluster."""
    pg: PgCluster | None = None
    database_url = ""
    if engine == "postgresql":
        started = time.monotonic()
        pg = PgCluster.start(cleanup)
        database_url = pg.create_database("keysteward_bench")
        say(f"[{engine}] PostgreSQL 15 cluster on 127.0.0.1:{pg.port} ({time.monotonic() - started:.1f} s)")
    server = KeystewardServer.init(cleanup, database_url=database_url)
    server.start(cleanup, workers=workers, env=env)
    return server, pg


def check_engine_args(parser: argparse.ArgumentParser, args: argparse.Namespace, engines: tuple[str, ...]) -> None:
    """``--engines`` (comma-separated, already defaulted) to a list, ``--duration`` defaulted; errors via parser."""
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engines) - set(engines))
    if unknown or not args.engines:
        parser.error(f"--engines takes {' and/or '.join(engines)}, not {','.join(unknown) or 'nothing'}")
    if args.duration is None:
        args.duration = 5.0 if args.quick else 20.0
    if args.duration < 1:
        parser.error("--duration must be at least 1 second")


def run_bench(
    bench: str,
    work: Callable[[Cleanup], list[dict[str, Any]]],
    widths: tuple[int, int] = (36, 6),
    *,
    closing: str = "",
) -> int:
    """A bench's main: ``work`` measures (its servers and files registered with the Cleanup, undone in
    any case), then the figures are reported. Exit 0, 1 with one line when the run cannot produce valid
    figures (:class:`BenchError`), 130 when interrupted."""
    started = time.monotonic()
    cleanup = Cleanup()
    try:
        figures = work(cleanup)
    except BenchError as exc:
        cleanup.failed = True
        print(f"{bench}: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{bench}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        cleanup.run()
    if closing:
        say(closing)
    report_figures(bench, figures, started, widths)
    return 0


def report_figures(
    bench: str, figures: list[dict[str, Any]], started: float, widths: tuple[int, int] = (36, 6)
) -> None:
    """One readable line per figure (with its target verdict), the run's duration, then the JSON line."""
    name_width, unit_width = widths
    for f in figures:
        verdict = "" if f["ok"] is None else f"  target {f['target']:g}: {'ok' if f['ok'] else 'MISSED'}"
        value = f"{f['value']:>12,.3f} {f['unit']:<{unit_width}}"
        say(f"  {f['name']:<{name_width}} {value} ratio {f['ratio']:.3g}{verdict}")
    say(f"{bench}: done in {time.monotonic() - started:.1f} s")
    emit_json(bench, figures)


def emit_json(bench: str, figures: list[dict[str, Any]]) -> None:
    print(json.dumps({"bench": bench, "figures": figures}), flush=True)
