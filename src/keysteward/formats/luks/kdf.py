"""Keyslot key derivation: PBKDF2 and Argon2i / Argon2id as LUKS uses them.

A keyslot's KDF turns the passphrase and a 32-byte salt into the key that encrypts the keyslot area.
Argon2 memory is in KiB, as in the LUKS2 JSON; ``cpus`` is Argon2's parallelism (lanes), version 0x13.
Argon2 runs through pyca/cryptography; if that build lacks a variant, through ``argon2-cffi`` when it
is installed. A keyslot whose Argon2 memory exceeds ``max_memory_kib`` is refused before any work
with code ``luks_argon2_memory``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from keysteward.formats.luks.errors import ARGON2_MEMORY, LuksFormatError, unsupported
from keysteward.formats.luks.hashes import hashlib_name, pbkdf2

SALT_SIZE = 32
DEFAULT_MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB; cryptsetup's own ceiling is 4 GiB
ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024
ARGON2_MAX_CPUS = 0xFFFFFF
U32_MAX = 0xFFFFFFFF

Argon2Kind = Literal["argon2i", "argon2id"]


@dataclass(frozen=True)
class Pbkdf2Params:
    hash: str
    iterations: int
    salt: bytes

    @property
    def type(self) -> str:
        return "pbkdf2"


@dataclass(frozen=True)
class Argon2Params:
    kind: Argon2Kind
    time: int
    memory_kib: int
    cpus: int
    salt: bytes

    @property
    def type(self) -> str:
        return self.kind


KdfParams = Pbkdf2Params | Argon2Params
"""How a keyslot's key is derived from its passphrase."""

Kdf = Callable[[KdfParams, bytes | bytearray, int], bytearray]
"""``kdf(params, passphrase, length) -> key``; :func:`derive_key` is the standard one."""


def new_pbkdf2(
    *, hash: str = "sha256", iterations: int = 1000, rng: Callable[[int], bytes] = os.urandom
) -> Pbkdf2Params:
    """PBKDF2 parameters with a fresh salt."""
    params = Pbkdf2Params(hash, iterations, rng(SALT_SIZE))
    validate_kdf(params)
    return params


def new_argon2(
    kind: Argon2Kind = "argon2id",
    *,
    time: int = 4,
    memory_kib: int = 32768,
    cpus: int = 1,
    rng: Callable[[int], bytes] = os.urandom,
) -> Argon2Params:
    """Argon2 parameters with a fresh salt."""
    params = Argon2Params(kind, time, memory_kib, cpus, rng(SALT_SIZE))
    validate_kdf(params)
    return params


def validate_kdf(params: KdfParams) -> None:
    """Check ranges (not availability) of KDF parameters; raise :class:`LuksFormatError`."""
    if len(params.salt) != SALT_SIZE:
        raise LuksFormatError(f"kdf salt is {len(params.salt)} bytes, LUKS uses {SALT_SIZE}")
    if isinstance(params, Pbkdf2Params):
        if not 1 <= params.iterations <= U32_MAX:
            raise LuksFormatError(f"pbkdf2 iterations {params.iterations} out of range")
        if not params.hash:
            raise LuksFormatError("pbkdf2 hash is empty")
        return
    if params.kind not in ("argon2i", "argon2id"):
        raise unsupported(f"kdf {params.kind!r} is not supported")
    if not 1 <= params.time <= U32_MAX:
        raise LuksFormatError(f"argon2 time {params.time} out of range")
    if not 1 <= params.cpus <= ARGON2_MAX_CPUS:
        raise LuksFormatError(f"argon2 cpus {params.cpus} out of range")
    if not 8 * params.cpus <= params.memory_kib <= U32_MAX:
        raise LuksFormatError(f"argon2 memory {params.memory_kib} KiB out of range (at least 8 KiB per cpu)")


def check_memory(params: KdfParams, max_memory_kib: int) -> None:
    """Raise ``luks_argon2_memory`` if ``params`` need more Argon2 memory than ``max_memory_kib``."""
    if isinstance(params, Argon2Params) and params.memory_kib > max_memory_kib:
        raise LuksFormatError(
            f"keyslot needs {params.kind} memory of {params.memory_kib} KiB ({params.memory_kib // 1024} MiB), "
            f"more than the {max_memory_kib} KiB allowed here; raise the Argon2 memory limit or use a machine "
            "with more memory",
            code=ARGON2_MEMORY,
        )


def derive_key(
    params: KdfParams, passphrase: bytes | bytearray, length: int, *, max_memory_kib: int = DEFAULT_MAX_MEMORY_KIB
) -> bytearray:
    """Derive ``length`` key bytes from ``passphrase``."""
    validate_kdf(params)
    check_memory(params, max_memory_kib)
    if not 1 <= length <= 1024:
        raise LuksFormatError(f"kdf output length {length} out of range")
    if isinstance(params, Pbkdf2Params):
        return pbkdf2(params.hash, passphrase, params.salt, params.iterations, length)
    return _argon2(params, passphrase, length)


def _argon2(params: Argon2Params, passphrase: bytes | bytearray, length: int) -> bytearray:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.kdf import argon2

    cls: Any = getattr(argon2, "Argon2id" if params.kind == "argon2id" else "Argon2i", None)
    if cls is not None:
        try:
            kdf = cls(
                salt=params.salt,
                length=length,
                iterations=params.time,
                lanes=params.cpus,
                memory_cost=params.memory_kib,
            )
            return bytearray(kdf.derive(bytes(passphrase)))
        except UnsupportedAlgorithm:
            pass
        except (ValueError, MemoryError) as exc:
            raise LuksFormatError(f"{params.kind} with these parameters failed: {exc}") from exc
    return _argon2_cffi(params, passphrase, length)


def _argon2_cffi(params: Argon2Params, passphrase: bytes | bytearray, length: int) -> bytearray:
    try:
        low_level: Any = importlib.import_module("argon2.low_level")
    except ImportError as exc:
        raise unsupported(
            f"{params.kind} is not available: this pyca/cryptography build lacks it and argon2-cffi is not installed"
        ) from exc
    kind = low_level.Type.ID if params.kind == "argon2id" else low_level.Type.I
    try:
        raw = low_level.hash_secret_raw(
            bytes(passphrase), params.salt, params.time, params.memory_kib, params.cpus, length, kind, version=0x13
        )
    except Exception as exc:  # argon2-cffi raises its own HashingError
        raise LuksFormatError(f"{params.kind} with these parameters failed: {exc}") from exc
    return bytearray(raw)


__all__ = [
    "DEFAULT_MAX_MEMORY_KIB",
    "SALT_SIZE",
    "Argon2Kind",
    "Argon2Params",
    "Kdf",
    "KdfParams",
    "Pbkdf2Params",
    "check_memory",
    "derive_key",
    "hashlib_name",
    "new_argon2",
    "new_pbkdf2",
    "validate_kdf",
]
