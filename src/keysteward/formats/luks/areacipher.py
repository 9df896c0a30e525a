"""Keyslot-area encryption: ``aes-xts-plain64`` over 512-byte sectors, IV restarting at 0.

Keyslot material is encrypted as if it were a tiny disk of its own: sector ``i`` of the area (counted
from the area's start, not the device's) uses tweak ``i`` as a 64-bit little-endian number. Keyslot
areas are a few hundred KiB, so one pyca ``Cipher`` per sector is fast enough; the bulk data path
lives in ``keysteward.crypto``.
"""

from __future__ import annotations

from collections.abc import Callable

from keysteward.formats.luks.errors import LuksFormatError, unsupported

SECTOR_SIZE = 512
SUPPORTED = ("aes-xts-plain64", "aes-xts-plain")

AreaCipher = Callable[[str, bytes | bytearray, bytes, bool], bytes]
"""``cipher(encryption, key, data, decrypt) -> data``; :func:`xts_area_cipher` is the standard one."""


def check_area_encryption(encryption: str, key_size: int) -> None:
    """Raise unless keysteward can en/decrypt a keyslot area with this cipher spec and key size."""
    if encryption.lower() not in SUPPORTED:
        raise unsupported(f"keyslot encryption {encryption!r} is not supported (only aes-xts-plain64)")
    if key_size not in (32, 64):
        raise unsupported(f"aes-xts needs a 32- or 64-byte key, not {key_size}")


def xts_area_cipher(encryption: str, key: bytes | bytearray, data: bytes, decrypt: bool) -> bytes:
    """En- or decrypt a keyslot area (a whole number of 512-byte sectors) with ``aes-xts-plain64``.

    ``aes-xts-plain`` is accepted too: its 32-bit IV equals plain64's below 2**32 sectors.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # not needed to import the codec

    check_area_encryption(encryption, len(key))
    if len(data) % SECTOR_SIZE:
        raise LuksFormatError(f"keyslot area of {len(data)} bytes is not a whole number of sectors")
    out = bytearray()
    try:
        for sector in range(len(data) // SECTOR_SIZE):
            cipher = Cipher(algorithms.AES(bytes(key)), modes.XTS(sector.to_bytes(16, "little")))
            ctx = cipher.decryptor() if decrypt else cipher.encryptor()
            out += ctx.update(data[sector * SECTOR_SIZE : (sector + 1) * SECTOR_SIZE]) + ctx.finalize()
    except ValueError as exc:  # e.g. an XTS key whose two halves are equal
        raise LuksFormatError(f"keyslot area cipher refused the key: {exc}") from exc
    return bytes(out)
