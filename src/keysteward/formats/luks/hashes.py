"""Hash names as LUKS headers spell them, mapped to hashlib."""

from __future__ import annotations

import hashlib

from keysteward.formats.luks.errors import LuksFormatError, unsupported

_NAMES = {
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
    "ripemd160": "ripemd160",
}


def hashlib_name(name: str) -> str:
    """The hashlib name of a LUKS hash name (case-insensitive, as cryptsetup lowercases them)."""
    mapped = _NAMES.get(name.lower())
    if mapped is None or mapped not in hashlib.algorithms_available:
        raise unsupported(f"hash {name!r} is not supported (use one of: {', '.join(sorted(_NAMES))})")
    return mapped


def digest_size(name: str) -> int:
    return hashlib.new(hashlib_name(name)).digest_size


def pbkdf2(name: str, secret: bytes | bytearray, salt: bytes, iterations: int, length: int) -> bytearray:
    """PBKDF2-HMAC with a LUKS hash name."""
    if not 1 <= iterations <= 0xFFFFFFFF:
        raise LuksFormatError(f"pbkdf2 iterations {iterations} out of range")
    if not 1 <= length <= 1024:
        raise LuksFormatError(f"pbkdf2 output length {length} out of range")
    return bytearray(hashlib.pbkdf2_hmac(hashlib_name(name), secret, salt, iterations, length))
