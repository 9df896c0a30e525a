"""KDF parameters for new keyslots: what the caller asked for, or defaults like cryptsetup's.

- ``pbkdf2`` (sha256): the iterations given, else as many as take about 2 s here (cryptsetup's
  ``--iter-time`` default), at least 1,000;
- ``argon2id``: time cost given, else 4 (cryptsetup's minimum); memory given, else 1 GiB or the
  machine's limit if lower; lanes given, else up to 4, at most the CPUs. Memory above the machine's
  limit is refused up front (``luks_argon2_memory``), before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

from keysteward.formats import luks
from keysteward.volume.errors import option_error
from keysteward.volume.sizes import cpu_count, default_argon2_memory_kib

KDF_TYPES = ("pbkdf2", "argon2id")
ITER_TIME_S = 2.0
MIN_PBKDF2_ITERATIONS = 1000
MAX_ITER_TIME_MS = 60_000
ARGON2_DEFAULT_TIME = 4
ARGON2_MAX_LANES = 4
_CALIBRATION_ITERATIONS = 20_000


@dataclass(frozen=True)
class KdfChoice:
    """The KDF a new keyslot should get; None fields take the defaults of the module doc."""

    type: str | None = None
    iterations: int | None = None
    """PBKDF2 iterations, or Argon2's time cost."""
    memory_kib: int | None = None
    parallel: int | None = None
    hash: str = "sha256"
    iter_time_ms: int | None = None
    """PBKDF2 only: as many iterations as take this long here (cryptsetup's ``--iter-time``)."""

    def resolved_type(self, default: str) -> str:
        kind = self.type or default
        if kind not in KDF_TYPES:
            raise option_error(f"KDF {kind!r} is not one of {', '.join(KDF_TYPES)}")
        return kind


def pbkdf2_iterations_for(seconds: float, hash_name: str = "sha256") -> int:
    """PBKDF2 iterations that take about ``seconds`` on this machine."""
    started = time.perf_counter()
    hashlib.pbkdf2_hmac(hash_name, b"calibration", os.urandom(32), _CALIBRATION_ITERATIONS, 32)
    elapsed = max(time.perf_counter() - started, 1e-6)
    return max(MIN_PBKDF2_ITERATIONS, int(_CALIBRATION_ITERATIONS * seconds / elapsed))


def new_kdf_params(choice: KdfChoice, *, default_type: str, limit_kib: int) -> luks.KdfParams:
    """Fresh KDF parameters (new salt) for a keyslot; raises before any work if they are not allowed."""
    kind = choice.resolved_type(default_type)
    if choice.iterations is not None and choice.iterations < 1:
        raise option_error(f"KDF iterations {choice.iterations} must be at least 1")
    if choice.iter_time_ms is not None:
        if kind != "pbkdf2":
            raise option_error("--iter-time applies to pbkdf2 here; Argon2's time cost is --pbkdf-force-iterations")
        if choice.iterations is not None:
            raise option_error("give --iter-time or --pbkdf-force-iterations, not both")
        if not 1 <= choice.iter_time_ms <= MAX_ITER_TIME_MS:
            raise option_error(f"--iter-time {choice.iter_time_ms} is not 1 to {MAX_ITER_TIME_MS} milliseconds")
    if kind == "pbkdf2":
        if choice.memory_kib is not None or choice.parallel is not None:
            raise option_error("--pbkdf-memory and --pbkdf-parallel apply to argon2id only")
        seconds = choice.iter_time_ms / 1000 if choice.iter_time_ms is not None else ITER_TIME_S
        iterations = choice.iterations or pbkdf2_iterations_for(seconds, choice.hash)
        return luks.new_pbkdf2(hash=choice.hash, iterations=iterations)
    memory = choice.memory_kib if choice.memory_kib is not None else default_argon2_memory_kib(limit_kib)
    lanes = choice.parallel if choice.parallel is not None else min(ARGON2_MAX_LANES, cpu_count())
    if lanes < 1 or memory < 8 * lanes:
        raise option_error(f"argon2id needs at least 1 lane and 8 KiB per lane ({memory} KiB, {lanes} lanes)")
    params = luks.new_argon2("argon2id", time=choice.iterations or ARGON2_DEFAULT_TIME, memory_kib=memory, cpus=lanes)
    luks.check_memory(params, limit_kib)
    return params


def describe_kdf(params: luks.KdfParams) -> dict[str, object]:
    """The KDF's parameters for people and ``--json`` (never the salt)."""
    if isinstance(params, luks.Pbkdf2Params):
        return {"type": "pbkdf2", "hash": params.hash, "iterations": params.iterations}
    return {"type": params.kind, "time": params.time, "memory_kib": params.memory_kib, "cpus": params.cpus}
