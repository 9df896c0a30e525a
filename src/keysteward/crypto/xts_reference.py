"""AES-XTS sectors the slow, obvious way, and the tweak arithmetic and checks both paths share.

The tweaks are dm-crypt's ``plain64`` (see :mod:`keysteward.crypto.xts`, which has the fast path and
the full rules). :func:`encrypt_sectors_reference` and :func:`decrypt_sectors_reference` run one
pyca/cryptography ``Cipher(AES(key), XTS(tweak))`` per sector: what :class:`~keysteward.crypto.xts.XtsCipher`
falls back to without the native extension, and what the tests hold the native path against.
"""

from __future__ import annotations

import hmac
import operator
from typing import Final

Buffer = bytes | bytearray | memoryview

KEY_SIZES: Final = (32, 64)
IV_UNIT: Final = 512
MAX_SECTOR_SIZE: Final = 4096
DM_CRYPT_SECTOR_SIZES: Final = (512, 1024, 2048, 4096)
_TWEAK_LIMIT: Final = 1 << 64
KEY_SIZE_ERROR: Final = "AES-XTS needs a 32-byte (AES-128) or 64-byte (AES-256) key"
EQUAL_HALVES_ERROR: Final = "XTS key halves must differ"


# -- argument checks shared by both paths ------------------------------------------------------


def byte_view(data: Buffer, what: str) -> memoryview:
    """A flat byte view of ``data`` (any C-contiguous buffer); raises TypeError for anything else."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{what} must be bytes, bytearray or memoryview, not {type(data).__name__}") from None
    if not view.c_contiguous:
        raise TypeError(f"{what} must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def check_key(key: memoryview) -> None:
    if key.nbytes not in KEY_SIZES:
        raise ValueError(KEY_SIZE_ERROR)
    half = key.nbytes // 2
    if hmac.compare_digest(key[:half], key[half:]):
        raise ValueError(EQUAL_HALVES_ERROR)


def tweak_step(sector_size: int, iv_large_sectors: bool) -> int:
    """Validates ``sector_size``; returns how far each sector advances the tweak."""
    if isinstance(sector_size, bool) or not isinstance(sector_size, int):
        raise TypeError("sector_size must be an int")
    if iv_large_sectors:
        if not (16 <= sector_size <= MAX_SECTOR_SIZE and sector_size % 16 == 0):
            raise ValueError(f"sector_size must be a multiple of 16 from 16 to {MAX_SECTOR_SIZE}, not {sector_size}")
        return 1
    if sector_size not in DM_CRYPT_SECTOR_SIZES:
        raise ValueError(
            f"sector_size must be one of {DM_CRYPT_SECTOR_SIZES} (dm-crypt's; the tweak counts {IV_UNIT}-byte "
            f"units; see iv_large_sectors for other data units), not {sector_size}"
        )
    return sector_size // IV_UNIT


def first_tweak(first_sector: int, iv_shift: int, n_sectors: int, step: int) -> int:
    first_sector = operator.index(first_sector)
    iv_shift = operator.index(iv_shift)
    if first_sector < 0 or iv_shift < 0:
        raise ValueError("first_sector and iv_shift must not be negative")
    first = first_sector + iv_shift
    if first + max(n_sectors - 1, 0) * step >= _TWEAK_LIMIT:
        raise ValueError("sector number beyond 2^64 - 1 (plain64 tweaks are 64-bit)")
    return first


def sector_count(data: memoryview, sector_size: int) -> int:
    if data.nbytes % sector_size:
        raise ValueError(f"data length {data.nbytes} is not a multiple of the sector size {sector_size}")
    return data.nbytes // sector_size


def out_view(out: bytearray | memoryview, length: int) -> memoryview:
    view = byte_view(out, "out")
    if view.readonly:
        raise TypeError("out must be a writable buffer")
    if view.nbytes < length:
        raise ValueError(f"out holds {view.nbytes} bytes, data needs {length}")
    return view[:length]


# -- reference path ----------------------------------------------------------------------------


def reference_into(
    encrypt: bool, key: bytes, sector_size: int, src: memoryview, dst: memoryview, first: int, step: int
) -> None:
    """One pyca Cipher per sector; ``dst`` may be ``src`` itself (each sector is read before it is written)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # the slow path only (~5 ms)

    algorithm = algorithms.AES(key)
    for offset in range(0, src.nbytes, sector_size):
        tweak = (first + (offset // sector_size) * step).to_bytes(16, "little")
        cipher = Cipher(algorithm, modes.XTS(tweak))
        context = cipher.encryptor() if encrypt else cipher.decryptor()
        dst[offset : offset + sector_size] = context.update(src[offset : offset + sector_size])


def _reference(
    encrypt: bool,
    key: Buffer,
    sector_size: int,
    data: Buffer,
    first_sector: int,
    iv_shift: int,
    iv_large_sectors: bool,
) -> bytes:
    key_view = byte_view(key, "key")
    check_key(key_view)
    step = tweak_step(sector_size, iv_large_sectors)
    src = byte_view(data, "data")
    first = first_tweak(first_sector, iv_shift, sector_count(src, sector_size), step)
    result = bytearray(src.nbytes)
    reference_into(encrypt, bytes(key_view), sector_size, src, memoryview(result), first, step)
    return bytes(result)


def encrypt_sectors_reference(
    key: Buffer,
    sector_size: int,
    data: Buffer,
    first_sector: int,
    iv_shift: int = 0,
    *,
    iv_large_sectors: bool = False,
) -> bytes:
    """Encrypt whole sectors with one pyca ``Cipher(AES, XTS(tweak))`` per sector (tweaks as in the module doc)."""
    return _reference(True, key, sector_size, data, first_sector, iv_shift, iv_large_sectors)


def decrypt_sectors_reference(
    key: Buffer,
    sector_size: int,
    data: Buffer,
    first_sector: int,
    iv_shift: int = 0,
    *,
    iv_large_sectors: bool = False,
) -> bytes:
    """Decrypt whole sectors with one pyca ``Cipher(AES, XTS(tweak))`` per sector (tweaks as in the module doc)."""
    return _reference(False, key, sector_size, data, first_sector, iv_shift, iv_large_sectors)
