"""The KMIP load generator of bench/kmip.py: bench/kmip_load.c, compiled at run time, checked, and run.

The C source is compiled once with ``gcc -O2 ... -lssl -lcrypto -pthread`` into a cache directory
(``$XDG_CACHE_HOME/keysteward-bench`` or ``~/.cache/keysteward-bench``), under a name that carries the hash
of the source, so an edited source is compiled again (and the earlier build removed) and an unchanged one is
reused. Before it is used, the
requests the binary sends (``kmip_load --dump``) are compared byte for byte with keysteward's own TTLV
codec's encoding of the same requests (:class:`KmipConn`'s ``encode``): a load generator that sent
something else would measure something else.

Not a bench itself: bench/kmip.py is, and ends with its ``{"bench": "kmip", "figures": [...]}`` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from _common import BenchError
from tests.support.kmip_client import KmipConn, aes_256_template, batch_item, uid

from keysteward.formats import kmip_ttlv as t

SOURCE = Path(__file__).with_name("kmip_load.c")
HEADER = Path(__file__).with_name("kmip_load_ttlv.h")
THREADS = 16


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keysteward-bench"


def build() -> Path:
    """The compiled load generator, from the cache when its source is unchanged."""
    source = SOURCE.read_bytes() + HEADER.read_bytes()
    binary = cache_dir() / f"kmip_load-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.exists():
        return binary
    gcc = shutil.which("gcc")
    if not gcc:
        raise BenchError("no gcc to build bench/kmip_load.c: run `bash scripts/bootstrap.sh`")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    args = [gcc, "-O2", "-Wall", "-Wextra", "-o", str(partial), str(SOURCE), "-lssl", "-lcrypto", "-pthread"]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BenchError(f"cannot build bench/kmip_load.c (is libssl-dev installed?):\n{done.stderr.strip()}")
    partial.replace(binary)  # atomic: a concurrent run sees the whole binary or none
    for stale in binary.parent.glob("kmip_load-*"):  # builds of earlier sources
        if stale != binary and not stale.name.endswith(".tmp"):
            stale.unlink(missing_ok=True)
    return binary


def expected_requests(version: tuple[int, int], key: str) -> dict[str, bytes]:
    """What the load generator must send, encoded by keysteward's codec."""
    conn = KmipConn.__new__(KmipConn)  # no connection: only its encoder
    conn.version = version
    params = t.struct_(
        "CryptographicParameters",
        t.enumeration("BlockCipherMode", 1),
        t.enumeration("PaddingMethod", 3),
        t.enumeration("CryptographicAlgorithm", 3),
    )
    return {
        "Create": conn.encode(batch_item("Create", *aes_256_template())),
        "Get": conn.encode(batch_item("Get", uid(key))),
        "Activate": conn.encode(batch_item("Activate", uid(key))),
        "GetAttributes": conn.encode(batch_item("GetAttributes", uid(key))),
        "Encrypt": conn.encode(batch_item("Encrypt", uid(key), params, t.byte_string("Data", bytes(64)))),
    }


def verify(binary: Path, version: tuple[int, int]) -> None:
    """The binary's requests equal the codec's, byte for byte (two identifier lengths: padding both ways)."""
    for key in ("0f3c2a9e-7d1b-4c5e-9a8f-2b6d4e1c3a70", "key-8"):
        done = subprocess.run([str(binary), "--dump", f"{version[0]}.{version[1]}", key],
                              capture_output=True, text=True, check=True)  # fmt: skip
        sent = dict(line.split(" ", 1) for line in done.stdout.splitlines())
        for name, want in expected_requests(version, key).items():
            if bytes.fromhex(sent.get(name, "")) != want:
                raise BenchError(f"bench/kmip_load.c encodes {name} unlike keysteward's TTLV codec")


@dataclass
class LoadResult:
    ops: int
    failures: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_s: float
    resumed: int  # connections that resumed a TLS session (mode new)
    failed_by: dict[str, int]  # failures by kind: connect, handshake, io, answer
    first_failure: str  # what the first one was

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


def run(
    binary: Path, mode: str, port: int, files: dict[str, str], seconds: float, version: tuple[int, int]
) -> LoadResult:
    args = [str(binary), "127.0.0.1", str(port), mode, str(THREADS), f"{seconds:g}",
            files["cert"], files["key"], files["server_ca"], f"{version[0]}.{version[1]}"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if done.returncode != 0:
        raise BenchError(f"kmip_load {mode} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return LoadResult(**json.loads(done.stdout.strip().splitlines()[-1]))
