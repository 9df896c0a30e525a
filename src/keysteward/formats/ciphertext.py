"""The envelope ciphertext blob returned by encrypt and generate-data-key.

Layout (all integers big-endian)::

    magic    2  b"KC"
    format   1  0x01
    key id  16  the key's UUID
    version  4  the key version that sealed it
    sealed   n  AES-256-GCM nonce (12) || ciphertext || tag (16)

The blob names its key and version so that old versions keep decrypting until destroyed.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from keysteward.errors import InvalidCiphertext

MAGIC = b"KC"
FORMAT = 1
_HEADER = struct.Struct(">2sB16sI")
HEADER_SIZE = _HEADER.size
MIN_SEALED = 12 + 16
MAX_BLOB = HEADER_SIZE + MIN_SEALED + 64 * 1024


@dataclass(frozen=True)
class CiphertextBlob:
    key_id: uuid.UUID
    version: int
    sealed: bytes


def encode(blob: CiphertextBlob) -> bytes:
    if not 1 <= blob.version <= 0xFFFFFFFF:
        raise ValueError("version out of range")
    return _HEADER.pack(MAGIC, FORMAT, blob.key_id.bytes, blob.version) + blob.sealed


def decode(data: bytes) -> CiphertextBlob:
    if len(data) > MAX_BLOB:
        raise InvalidCiphertext("ciphertext is larger than any keysteward ciphertext")
    if len(data) < HEADER_SIZE + MIN_SEALED:
        raise InvalidCiphertext("ciphertext is truncated")
    magic, fmt, key_id, version = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InvalidCiphertext("not a keysteward ciphertext (wrong magic)")
    if fmt != FORMAT:
        raise InvalidCiphertext(f"unsupported ciphertext format {fmt}")
    if version == 0:
        raise InvalidCiphertext("ciphertext names key version 0")
    return CiphertextBlob(uuid.UUID(bytes=key_id), version, data[HEADER_SIZE:])
