"""Long-running keysteward processes under test (``agent run``, ``proxy serve``): their status file,
waiting for a state, stopping them, and reading what their memory holds."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class Daemon:
    """A process started with a JSON status file and a log; subclasses start ``proc``."""

    name = "daemon"
    proc: subprocess.Popen[bytes]
    status_file: Path
    log: Path

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    def ready(self, status: dict[str, Any]) -> bool:
        """Whether ``status`` is complete enough to be judged (by default: it is there)."""
        return bool(status)

    def wait(self, what: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.proc.poll() is None
            assert running, f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-3000:]}"
            status = self.status()
            if self.ready(status) and what(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"timed out; status {self.status()}; log {self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def reaped(started: list[Any]) -> Iterator[list[Any]]:
    """A fixture body: yields the list the test fills with daemons, kills those still running after."""
    yield started
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


def memory_holds(pid: int, needles: dict[str, bytes]) -> set[str]:
    """Which ``needles`` appear anywhere in the readable memory of process ``pid``."""
    found: set[str] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vdso]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            found |= {label for label, needle in needles.items() if needle in data}
    return found
