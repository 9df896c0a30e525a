"""The real tools the tests drive: find them (the test command installs them) and work around their quirks."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

import pytest

MISSING = "{tool} is missing; the test command installs it (scripts/bootstrap.sh: apt-get install -y {package})"
QEMU_CPU_CLOCK = b"accurate CPU usage"
QEMU_CREATE_TRIES = 200


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)
    if found is None:
        pytest.fail(MISSING.format(tool=name, package=package))
    return found


def qemu_img_create(argv: Sequence[str]) -> None:
    """Run ``qemu-img create -f luks ...``, which benchmarks PBKDF2 before it writes the header.

    QEMU 7.2 times its first round of 2^15 iterations with ``getrusage(RUSAGE_THREAD)`` and reads only
    ``ru_utime``. The kernel splits a thread's precise run time into user and system time by tick samples,
    so on a machine where no user-mode tick lands in that ~10 ms round, QEMU reads 0 ms and gives up with
    "Unable to get accurate CPU usage" (on CI runners most rounds do). The failure comes in milliseconds and
    changes nothing on disk, so the round is simply tried again; any other failure fails the test at once.
    """
    for _ in range(QEMU_CREATE_TRIES):
        done = subprocess.run(list(argv), capture_output=True, timeout=120, check=False)
        if done.returncode == 0:
            return
        if QEMU_CPU_CLOCK not in done.stderr:
            break
    pytest.fail(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
