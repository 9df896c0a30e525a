"""Helpers the volume tests share (the real tools, the CLI as a subprocess), and a check that the tools
are the ones the interop tests are written against.

The tools come from Debian (``cryptsetup-bin``, ``qemu-utils``), which the test command installs
(scripts/bootstrap.sh); a missing tool fails the test with that hint, it never skips.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.tools import tool

pytestmark = pytest.mark.integration

KEYSTEWARD = str(Path(sys.executable).with_name("keysteward"))
MIB = 1024 * 1024
PBKDF2_FAST = ["--kdf", "pbkdf2", "--pbkdf-iterations", "1000"]
CS_PBKDF2_FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
CS_ARGON2_SMALL = ["--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4",
                   "--pbkdf-parallel", "1"]  # fmt: skip


def run(
    argv: Sequence[str], *, check: bool = True, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(list(argv), capture_output=True, input=input, timeout=timeout, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    return done


def ks(*args: str | Path, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """``keysteward volume ARGS`` as a subprocess."""
    return run([KEYSTEWARD, "volume", *map(str, args)], check=check, input=input)


def assert_one_line_error(done: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """A failed CLI run: non-zero exit, exactly one line on stderr, no traceback; returns the line."""
    err = done.stderr.decode(errors="replace")
    assert done.returncode != 0, f"expected a failure, got exit 0 (stderr {err!r})"
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def keyfile(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def pattern(size: int, seed: int = 1) -> bytes:
    """Reproducible random-looking bytes (so that any misplaced sector shows)."""
    return random.Random(seed).randbytes(size)


def volume_key_from_cryptsetup(cryptsetup: str, image: Path, key_file: Path) -> bytes:
    out = run([cryptsetup, "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", str(key_file), str(image)])
    found = re.search(r"(?:MK dump|Volume key):\s*((?:[0-9a-f]{2}\s*)+)", out.stdout.decode())
    assert found, f"no volume key in luksDump output:\n{out.stdout.decode()}"
    return bytes.fromhex("".join(found.group(1).split()))


def test_tools_are_installed_in_the_versions_the_tests_expect() -> None:
    cryptsetup = run([tool("cryptsetup", "cryptsetup-bin"), "--version"]).stdout.decode()
    assert re.match(r"cryptsetup 2\.", cryptsetup), cryptsetup
    qemu_img = run([tool("qemu-img", "qemu-utils"), "--version"]).stdout.decode()
    assert re.search(r"version [0-9]+\.", qemu_img), qemu_img
    tool("qemu-io", "qemu-utils")
    assert os.access(KEYSTEWARD, os.X_OK), f"{KEYSTEWARD} is not installed: pip install -e . in the venv"
