"""A multi-worker ``keysteward server start`` seen from /proc: its workers, the sockets they hold, stopping one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from tests.fixtures.keysteward import ServerProcess


def worker_pids(supervisor: int, count: int = 2) -> list[int]:
    """The supervisor's worker processes (there must be ``count``)."""
    workers = [int(child) for child in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    assert len(workers) == count
    return workers


def _tcp_inodes(port: int, *, listening: bool) -> set[str]:
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == port and (fields[3] == "0A") == listening:  # 0A: LISTEN
            inodes.add(fields[9])
    return inodes


def listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on ``port`` (IPv4), from /proc/net/tcp."""
    return _tcp_inodes(port, listening=True)


def connection_inodes(port: int) -> set[str]:
    """The inodes of the accepted connections on local ``port`` (IPv4) in any state but LISTEN."""
    return _tcp_inodes(port, listening=False) - {"0"}


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def wait_stopped(pid: int) -> None:
    """Until every thread of ``pid`` is stopped (a signal is delivered after ``kill`` returns)."""
    deadline = time.monotonic() + 10
    while True:
        states = [
            (task / "stat").read_text().rpartition(")")[2].split()[0] for task in Path(f"/proc/{pid}/task").iterdir()
        ]
        if all(state == "T" for state in states):
            return
        assert time.monotonic() < deadline, f"worker {pid} did not stop: {states}"
        time.sleep(0.01)


def wait_all_serving(server: ServerProcess, count: int = 2) -> None:
    """Until each of the server's ``count`` workers has answered on the REST port. A worker still starting
    accepts nothing, and the others take its share meanwhile (keysteward/server/accept_balance.py); held open,
    each next connection goes to the worker holding the fewest, so a worker that is up answers one soon."""
    held: list[httpx.Client] = []
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(seen) < count:
            assert time.monotonic() < deadline, f"only workers {sorted(seen)} answered in 30 s"
            held.append(server.http())
            seen.add(held[-1].get("/health").json()["process"])
            time.sleep(0.2)
    finally:
        for client in held:
            client.close()
