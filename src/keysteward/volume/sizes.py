"""Sizes as people write them (``64M``, ``1G``, ``4096``), and the Argon2 memory a machine affords."""

from __future__ import annotations

import os
import re

from keysteward.volume.errors import option_error

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
_UNITS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB, "P": 1024 * 1024 * GIB}
_SIZE = re.compile(r"([0-9]{1,20})\s*([KMGTP]?)(?:I?B)?", re.IGNORECASE)
MAX_SIZE = 2**63 - 1

ARGON2_CREATE_CEILING_KIB = 1024 * 1024
"""Default Argon2 memory for new keyslots at most (1 GiB, as cryptsetup)."""
ARGON2_OPEN_CEILING_KIB = 4 * 1024 * 1024
"""Largest Argon2 memory LUKS2 allows (4 GiB): what opening may use on a machine that has it."""


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in ``text``: a number with an optional binary unit K, M, G, T, P (``64M``, ``1GiB``, ``4096``)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise option_error(f"{what} {text[:40]!r} is not a size like 4096, 64M or 1G")
    value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if value > MAX_SIZE:
        raise option_error(f"{what} {text[:40]!r} is too large")
    return value


def format_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that divides it (``67108864`` -> ``64 MiB``)."""
    for unit, factor in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def available_memory_kib(meminfo: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of the machine in KiB, None when unknown."""
    try:
        with open(meminfo, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def argon2_limit_kib(override: int | None = None) -> int:
    """The most Argon2 memory a keyslot may use here: half of the available memory, at most 4 GiB.

    ``override`` (KiB, from configuration) replaces the machine's figure, for operators and tests.
    """
    if override is not None:
        if override < 8:
            raise option_error(f"Argon2 memory limit {override} KiB is below the minimum of 8 KiB")
        return override
    available = available_memory_kib()
    if available is None:
        return ARGON2_CREATE_CEILING_KIB
    return max(8, min(ARGON2_OPEN_CEILING_KIB, available // 2))


def default_argon2_memory_kib(limit_kib: int) -> int:
    """Memory for a new Argon2 keyslot: 1 GiB, or the machine's limit if that is lower."""
    return min(ARGON2_CREATE_CEILING_KIB, limit_kib)


def cpu_count() -> int:
    return os.cpu_count() or 1
