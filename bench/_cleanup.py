"""The benches' error and output, and what a run undoes: LIFO cleanup callbacks, temporary directories, a free
port, and stopping the processes a bench started. Every name here is importable from bench/_common.py too.

Not a bench itself: the benches that use it (through bench/_common.py) end with their
``{"bench": NAME, "figures": [...]}`` line (:func:`_common.run_bench`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
