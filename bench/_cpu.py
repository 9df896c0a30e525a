"""CPU accounting for the benches, from /proc and getrusage: a process's children, the CPU seconds of
processes, the machine's busy share, and the CPU of this process's children (wrk). Every name here is
importable from bench/_common.py too.

Not a bench itself: the benches that use it (through bench/_common.py) end with their
``{"bench": NAME, "figures": [...]}`` line (:func:`_common.run_bench`).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

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
