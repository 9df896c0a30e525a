"""Shared helpers for the scripts under bench/: cleanup, a throw-away PostgreSQL cluster, a real
keysteward server process, wrk runs and their parsing, CPU accounting, and the closing JSON line.

This module holds the figures, the server on a chosen engine and a bench's main (:func:`run_bench`); the rest
lives in modules of its own, every name of which is importable from here as well: bench/_cleanup.py (the
error, output, cleanup, processes), bench/_server.py (PostgreSQL, the keysteward server), bench/_cpu.py (CPU
accounting) and bench/_wrk.py (wrk runs and the CPU they cost).

Nothing here imports pytest or the test fixtures: a bench runs with the project's runtime
dependencies only (the PostgreSQL helper mirrors tests/fixtures/postgres.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from _cleanup import BenchError, Cleanup, free_port, make_temp_dir, say, stop_process
from _cpu import background_load, children, children_cpu_seconds, machine_cpu, process_cpu_seconds
from _server import REPO, KeystewardServer, PgCluster, _clean_env, keysteward_cli
from _wrk import (
    WrkMeasurement,
    WrkResult,
    cpu_line,
    lua_string,
    measure_wrk,
    parse_wrk,
    run_wrk,
    wrk_binary,
    wrk_post_script,
)

__all__ = [
    "REPO",
    "BenchError",
    "Cleanup",
    "KeystewardServer",
    "PgCluster",
    "WrkMeasurement",
    "WrkResult",
    "_clean_env",
    "background_load",
    "check_engine_args",
    "children",
    "children_cpu_seconds",
    "cpu_line",
    "emit_json",
    "engine_server",
    "figure",
    "free_port",
    "keysteward_cli",
    "lua_string",
    "machine_cpu",
    "make_temp_dir",
    "measure_wrk",
    "parse_wrk",
    "process_cpu_seconds",
    "ratio_figure",
    "report_figures",
    "run_bench",
    "run_wrk",
    "say",
    "stop_process",
    "wrk_binary",
    "wrk_post_script",
]


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
