"""The anti-forensic information splitter of LUKS (AF split / merge, LUKS1 "diffuse" with a hash).

A key of ``n`` bytes becomes ``stripes`` blocks of ``n`` bytes: all but the last are random, each is
XORed into a running buffer that is then diffused (hashed block by block with a big-endian block index
prefix), and the last block is the key XOR that buffer. Losing any one stripe loses the key. LUKS1 and
LUKS2 both use 4000 stripes. On disk the split material is rounded up to whole 512-byte sectors.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from keysteward.formats.luks.errors import LuksFormatError
from keysteward.formats.luks.hashes import hashlib_name

SECTOR_SIZE = 512
STRIPES = 4000
MAX_KEY_BYTES = 512
MAX_STRIPES = 4000


def af_sectors(key_size: int, stripes: int = STRIPES) -> int:
    """512-byte sectors that the split material of a ``key_size``-byte key occupies."""
    _check(key_size, stripes)
    return (key_size * stripes + SECTOR_SIZE - 1) // SECTOR_SIZE


def af_size(key_size: int, stripes: int = STRIPES) -> int:
    """Bytes of split material on disk, rounded up to whole sectors."""
    return af_sectors(key_size, stripes) * SECTOR_SIZE


def _check(key_size: int, stripes: int) -> None:
    if not 1 <= key_size <= MAX_KEY_BYTES:
        raise LuksFormatError(f"key size {key_size} bytes is out of range 1..{MAX_KEY_BYTES}")
    if not 1 <= stripes <= MAX_STRIPES:
        raise LuksFormatError(f"AF stripes {stripes} is out of range 1..{MAX_STRIPES}")


def _diffuser(hash_name: str, size: int) -> Callable[[bytes], bytes]:
    name = hashlib_name(hash_name)
    proto = hashlib.new(name)
    digest = proto.digest_size
    blocks = []
    for i in range((size + digest - 1) // digest):
        prefixed = proto.copy()  # the block index hashed once; each use copies that state (cheaper than new())
        prefixed.update(i.to_bytes(4, "big"))
        blocks.append((prefixed.copy, i * digest, min(size, (i + 1) * digest)))

    def diffuse(buf: bytes) -> bytes:
        parts = []
        for fresh, start, end in blocks:
            h = fresh()
            h.update(buf[start:end])
            parts.append(h.digest()[: end - start])
        return b"".join(parts)

    return diffuse


def _xor(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def af_split(
    key: bytes | bytearray,
    hash_name: str,
    stripes: int = STRIPES,
    *,
    rng: Callable[[int], bytes] = os.urandom,
) -> bytearray:
    """Split ``key`` into ``stripes`` blocks (``len(key) * stripes`` bytes, not sector-padded)."""
    size = len(key)
    _check(size, stripes)
    diffuse = _diffuser(hash_name, size)
    out = bytearray(rng(size * (stripes - 1)))
    if len(out) != size * (stripes - 1):
        raise LuksFormatError("random source returned the wrong number of bytes")
    buf = bytes(size)
    for i in range(stripes - 1):
        buf = diffuse(_xor(out[i * size : (i + 1) * size], buf))
    out += _xor(key, buf)
    return out


def af_merge(material: bytes | bytearray, key_size: int, hash_name: str, stripes: int = STRIPES) -> bytearray:
    """Recover a ``key_size``-byte key from split material (at least ``key_size * stripes`` bytes)."""
    _check(key_size, stripes)
    if len(material) < key_size * stripes:
        raise LuksFormatError(f"AF material is {len(material)} bytes, {key_size * stripes} needed")
    diffuse = _diffuser(hash_name, key_size)
    view = memoryview(material)
    buf = bytes(key_size)
    for i in range(stripes - 1):
        buf = diffuse(_xor(view[i * key_size : (i + 1) * key_size], buf))
    last = stripes - 1
    return bytearray(_xor(view[last * key_size : (last + 1) * key_size], buf))
