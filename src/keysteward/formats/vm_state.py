"""The header of an encrypted VM state file (a snapshot of a VM's memory and devices). Pure codec, no I/O.

A snapshot file is this header followed by a Tink AES-GCM-HKDF stream (keysteward.crypto.streaming_aead)
of QEMU's migration stream. All integers big-endian::

    magic          10  b"KSVMSTATE1"
    version         1  1
    header_length   2  the whole header's length in bytes, these 13 included (<= MAX_HEADER_SIZE)
    tenant        1+n  length byte, then ASCII (an ID: letters, digits, ``._:@-``, 1..128 bytes)
    vm_id         1+n  likewise
    snapshot_id   1+n  likewise
    created_at      8  Unix seconds
    segment_size    4  the stream's ciphertext segment size (MIN_SEGMENT_SIZE..MAX_SEGMENT_SIZE)
    wrapped_key  1+60  length byte (60), then AES-256-GCM nonce (12) || snapshot key (32) || tag (16)

The snapshot key is wrapped under the VM key with :meth:`SnapshotHeader.wrap_aad` (every field but the
wrapped key) as associated data; the stream's associated data is the whole header
(:meth:`SnapshotHeader.stream_aad`), so tenant, VM, snapshot id, time, segment size and the wrapped key
are all bound. :func:`decode` is strict: wrong magic, unknown version, truncated, oversized or malformed
fields and trailing bytes inside the declared length are all refused with a clear error.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from keysteward.errors import InvalidCiphertext

MAGIC = b"KSVMSTATE1"
VERSION = 1
PREAMBLE_SIZE = len(MAGIC) + 1 + 2
MAX_HEADER_SIZE = 1024
MAX_ID_BYTES = 128
WRAPPED_KEY_SIZE = 12 + 32 + 16
MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 64 << 20
MAX_CREATED_AT = (1 << 63) - 1
_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_WRAP_DOMAIN = b"keysteward vm-state snapshot key\x00"


class SnapshotFormatError(InvalidCiphertext):
    """The bytes are not a well-formed keysteward VM state header."""

    code = "snapshot_malformed"
    title = "Malformed VM state snapshot"


def _check_id(what: str, value: str) -> bytes:
    raw = value.encode("ascii", "replace") if isinstance(value, str) else b""
    if not _ID.fullmatch(raw):
        raise SnapshotFormatError(
            f"{what} must be 1..{MAX_ID_BYTES} ASCII letters, digits or ._:@- (starting with a letter or digit)",
            code="snapshot_bad_field",
        )
    return raw


@dataclass(frozen=True)
class SnapshotHeader:
    tenant: str
    vm_id: str
    snapshot_id: str
    created_at: int
    segment_size: int
    wrapped_key: bytes

    def __post_init__(self) -> None:
        for what in ("tenant", "vm_id", "snapshot_id"):
            _check_id(what, getattr(self, what))
        if not 0 <= self.created_at <= MAX_CREATED_AT:
            raise SnapshotFormatError("created_at is out of range", code="snapshot_bad_field")
        if not MIN_SEGMENT_SIZE <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise SnapshotFormatError(
                f"segment size must be {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE} bytes", code="snapshot_bad_field"
            )
        if len(self.wrapped_key) != WRAPPED_KEY_SIZE:
            raise SnapshotFormatError(f"wrapped key must be {WRAPPED_KEY_SIZE} bytes", code="snapshot_bad_field")

    def _fields(self) -> bytes:
        out = bytearray()
        for value in (self.tenant, self.vm_id, self.snapshot_id):
            raw = value.encode("ascii")
            out += bytes([len(raw)]) + raw
        out += struct.pack(">QI", self.created_at, self.segment_size)
        return bytes(out)

    def wrap_aad(self) -> bytes:
        """Associated data of the snapshot key's wrap: the domain, magic, version and every bound field."""
        return _WRAP_DOMAIN + MAGIC + bytes([VERSION]) + self._fields()

    def encode(self) -> bytes:
        body = self._fields() + bytes([len(self.wrapped_key)]) + self.wrapped_key
        return MAGIC + bytes([VERSION]) + struct.pack(">H", PREAMBLE_SIZE + len(body)) + body

    def stream_aad(self) -> bytes:
        """Associated data of the stream: the header's canonical bytes, wrapped key included."""
        return self.encode()


def header_length(preamble: bytes) -> int:
    """The whole header's length from its first :data:`PREAMBLE_SIZE` bytes (magic, version checked)."""
    if len(preamble) < PREAMBLE_SIZE:
        raise SnapshotFormatError("snapshot header is truncated")
    if preamble[: len(MAGIC)] != MAGIC:
        raise SnapshotFormatError("not a keysteward VM state snapshot (wrong magic)", code="snapshot_not_recognised")
    version = preamble[len(MAGIC)]
    if version != VERSION:
        raise SnapshotFormatError(f"unknown snapshot format version {version}", code="snapshot_unsupported_version")
    (length,) = struct.unpack_from(">H", preamble, len(MAGIC) + 1)
    if not PREAMBLE_SIZE < length <= MAX_HEADER_SIZE:
        raise SnapshotFormatError(f"snapshot header length {length} is out of range")
    return int(length)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise SnapshotFormatError(f"snapshot header is truncated in {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def ident(self, what: str) -> str:
        size = self.take(1, what)[0]
        if not 1 <= size <= MAX_ID_BYTES:
            raise SnapshotFormatError(f"{what} length {size} is out of range")
        raw = self.take(size, what)
        return _check_id(what, raw.decode("latin-1")).decode("ascii")


def decode(data: bytes) -> SnapshotHeader:
    """Exactly one header: ``data`` must be the ``header_length`` bytes :func:`header_length` announced."""
    length = header_length(data[:PREAMBLE_SIZE])
    if len(data) < length:
        raise SnapshotFormatError("snapshot header is truncated")
    if len(data) > length:
        raise SnapshotFormatError("bytes after the snapshot header's declared end")
    r = _Reader(data, PREAMBLE_SIZE)
    tenant, vm_id, snapshot_id = r.ident("tenant"), r.ident("vm_id"), r.ident("snapshot_id")
    created_at, segment_size = struct.unpack(">QI", r.take(12, "created_at and segment_size"))
    wrapped_size = r.take(1, "wrapped key")[0]
    if wrapped_size != WRAPPED_KEY_SIZE:
        raise SnapshotFormatError(f"wrapped key length {wrapped_size} is not {WRAPPED_KEY_SIZE}")
    wrapped_key = r.take(wrapped_size, "wrapped key")
    if r.pos != length:
        raise SnapshotFormatError("trailing bytes inside the snapshot header")
    header = SnapshotHeader(tenant, vm_id, snapshot_id, created_at, segment_size, wrapped_key)
    if header.encode() != data:  # one canonical form: what is authenticated is what was read
        raise SnapshotFormatError("snapshot header is not in canonical form")
    return header
