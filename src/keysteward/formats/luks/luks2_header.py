"""LUKS2 binary headers: both copies, checksums, recovery, and the bytes to write.

On disk (all integers big-endian), twice: the primary copy at 0, the secondary at ``hdr_size``::

    0    magic      6   "LUKS\\xba\\xbe" (primary) | "SKUL\\xba\\xbe" (secondary)
    6    version    2   2
    8    hdr_size   8   binary header + JSON area: 16 KiB .. 4 MiB, a power of two
    16   seqid      8   increased on every update
    24   label      48  NUL-terminated
    72   csum_alg   32  "sha256"
    104  salt       64  unique per copy
    168  uuid       40
    208  subsystem  48
    256  hdr_offset 8   where this copy is: 0 or hdr_size
    264  padding    184
    448  csum       64  hash(binary header with csum zeroed || whole JSON area)
    512  padding    3584
    4096 JSON area  hdr_size - 4096: JSON text, then zeros

Reading takes the device's first bytes and its size, checks both copies, and uses the valid one with
the higher seqid (primary on a tie); when the primary is damaged beyond finding its size, the
secondary is searched for at each allowed ``hdr_size``, as cryptsetup does. Writing returns the two
copies (primary first, as cryptsetup writes them) with the seqid increased.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Literal

from keysteward.formats.luks.common import RandomSource, Write, cstring, encode_cstring
from keysteward.formats.luks.errors import ARGON2_MEMORY, CHECKSUM, REENCRYPTION, UNSUPPORTED, LuksFormatError
from keysteward.formats.luks.hashes import hashlib_name
from keysteward.formats.luks.luks2_json import METADATA_SIZES, encode_json_area, parse_json_area
from keysteward.formats.luks.luks2_model import BINARY_HEADER_SIZE, Luks2Metadata

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
VERSION = 2
SALT_SIZE = 64
CSUM_OFFSET = 448
CSUM_SIZE = 64
MAX_SPAN = 2 * METADATA_SIZES[-1]
"""Bytes from the device start that always cover both header copies."""
U64_MAX = 2**64 - 1

_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_REFUSALS = (REENCRYPTION, UNSUPPORTED, ARGON2_MEMORY)


@dataclass(frozen=True)
class Luks2BinaryHeader:
    """The fixed 4096-byte part of one header copy."""

    secondary: bool
    hdr_size: int
    seqid: int
    label: str
    checksum_alg: str
    salt: bytes
    uuid: str
    subsystem: str
    hdr_offset: int
    checksum: bytes


@dataclass(frozen=True)
class Luks2Header:
    """A LUKS2 header as read from (or to be written to) a device."""

    metadata: Luks2Metadata
    hdr_size: int
    seqid: int
    uuid: str
    label: str = ""
    subsystem: str = ""
    checksum_alg: str = "sha256"
    salt_primary: bytes | None = None
    salt_secondary: bytes | None = None
    source: Literal["primary", "secondary"] = "primary"
    """The copy that was used."""
    needs_repair: bool = False
    """A copy is damaged or older than the other: writing the header again repairs it."""
    problems: tuple[str, ...] = ()
    """What was wrong with the copy (or copies) not used, for an operator."""


def parse_binary_header(block: bytes, *, secondary: bool) -> Luks2BinaryHeader:
    """Parse and sanity-check the 4096-byte binary header of one copy (the checksum is not checked here)."""
    which = "secondary" if secondary else "primary"
    if len(block) < BINARY_HEADER_SIZE:
        raise LuksFormatError(f"{which} LUKS2 header is truncated ({len(block)} of {BINARY_HEADER_SIZE} bytes)")
    magic, version, hdr_size, seqid, label, alg, salt, uuid, subsystem, offset, _pad, csum = _BIN.unpack_from(block)
    if magic != (MAGIC_SECONDARY if secondary else MAGIC_PRIMARY):
        raise LuksFormatError(f"no {which} LUKS2 header (wrong magic)")
    if version != VERSION:
        raise LuksFormatError(f"{which} LUKS header has version {version}, not 2")
    if hdr_size not in METADATA_SIZES:
        raise LuksFormatError(f"{which} LUKS2 header has an unsupported size {hdr_size}")
    return Luks2BinaryHeader(
        secondary, hdr_size, seqid, cstring(label, "label"), cstring(alg, "checksum_alg"), salt,
        cstring(uuid, "uuid"), cstring(subsystem, "subsystem"), offset, csum,
    )  # fmt: skip


def _checksum(alg: str, binary: bytes, area: bytes) -> bytes:
    try:
        name = hashlib_name(alg)
    except LuksFormatError as exc:
        raise LuksFormatError(f"LUKS2 header checksum algorithm {alg!r} is not supported") from exc
    zeroed = binary[:CSUM_OFFSET] + bytes(CSUM_SIZE) + binary[CSUM_OFFSET + CSUM_SIZE : BINARY_HEADER_SIZE]
    return hashlib.new(name, zeroed + area).digest()


@dataclass(frozen=True)
class _Copy:
    binary: Luks2BinaryHeader | None = None
    metadata: Luks2Metadata | None = None
    error: LuksFormatError | None = None
    checksum_ok: bool = False

    @property
    def usable(self) -> bool:
        """Valid, or valid but refused (the refusal then wins if this copy is the newer one)."""
        return self.metadata is not None or (
            self.checksum_ok and self.error is not None and self.error.code in _REFUSALS
        )


def _read_copy(data: bytes, offset: int, secondary: bool, device_size: int) -> _Copy:
    which = "secondary" if secondary else "primary"
    try:
        binary = parse_binary_header(data[offset : offset + BINARY_HEADER_SIZE], secondary=secondary)
    except LuksFormatError as exc:
        return _Copy(error=exc)
    if binary.hdr_offset != offset or (secondary and binary.hdr_size != offset):
        return _Copy(
            binary, error=LuksFormatError(f"{which} LUKS2 header at {offset} says it is at {binary.hdr_offset}")
        )
    end = offset + binary.hdr_size
    if end > len(data):
        return _Copy(binary, error=LuksFormatError(f"{which} LUKS2 header is truncated (needs {end} bytes)"))
    area = data[offset + BINARY_HEADER_SIZE : end]
    try:
        expected = _checksum(binary.checksum_alg, data[offset : offset + BINARY_HEADER_SIZE], area)
    except LuksFormatError as exc:
        return _Copy(binary, error=exc)
    if not hmac.compare_digest(expected, binary.checksum[: len(expected)]):
        return _Copy(binary, error=LuksFormatError(f"{which} LUKS2 header checksum mismatch", code=CHECKSUM))
    try:
        return _Copy(binary, parse_json_area(area, device_size=device_size), checksum_ok=True)
    except LuksFormatError as exc:
        return _Copy(
            binary, error=LuksFormatError(f"{which} LUKS2 header: {exc.message}", code=exc.code), checksum_ok=True
        )


def _failure(primary: _Copy, secondary: _Copy) -> LuksFormatError:
    for copy in (primary, secondary):
        if copy.checksum_ok and copy.error is not None:
            return copy.error
    if any(c.error is not None and c.error.code == CHECKSUM for c in (primary, secondary)):
        return LuksFormatError("no LUKS2 header copy passes its checksum", code=CHECKSUM)
    assert primary.error is not None
    return primary.error


def read_luks2(data: bytes, *, device_size: int) -> Luks2Header:
    """Read the LUKS2 header from ``data``, the first bytes of a device of ``device_size`` bytes.

    ``data`` should cover both copies: ``min(device_size, required_span(...))`` bytes, or simply
    ``min(device_size, MAX_SPAN)``. Raises :class:`LuksFormatError` when no copy is usable.
    """
    if device_size < 2 * METADATA_SIZES[0] or len(data) < BINARY_HEADER_SIZE:
        raise LuksFormatError(f"device of {device_size} bytes is too small for a LUKS2 header")
    if len(data) > device_size:
        raise LuksFormatError(f"{len(data)} header bytes given for a device of {device_size} bytes")
    primary = _read_copy(data, 0, False, device_size)
    if primary.checksum_ok and primary.binary is not None:
        secondary = _read_copy(data, primary.binary.hdr_size, True, device_size)
    else:
        secondary = _Copy(error=LuksFormatError("no secondary LUKS2 header found"))
        for offset in METADATA_SIZES:
            candidate = _read_copy(data, offset, True, device_size)
            if candidate.checksum_ok:
                secondary = candidate
                break
            if candidate.binary is not None and secondary.binary is None:
                secondary = candidate
    usable = [c for c in (primary, secondary) if c.usable]
    if not usable:
        raise _failure(primary, secondary)
    chosen = max(usable, key=lambda c: c.binary.seqid if c.binary else -1)  # max keeps the primary on a tie
    if chosen.metadata is None:
        assert chosen.error is not None
        raise chosen.error
    binary = chosen.binary
    assert binary is not None
    in_sync = (
        primary.metadata is not None
        and secondary.metadata is not None
        and primary.binary is not None
        and secondary.binary is not None
        and primary.binary.seqid == secondary.binary.seqid
    )
    problems = tuple(c.error.message for c in (primary, secondary) if c.error is not None)
    if not problems and not in_sync:
        problems = ("the two LUKS2 header copies have different seqids",)
    return Luks2Header(
        metadata=chosen.metadata,
        hdr_size=binary.hdr_size,
        seqid=binary.seqid,
        uuid=binary.uuid,
        label=binary.label,
        subsystem=binary.subsystem,
        checksum_alg=binary.checksum_alg,
        salt_primary=primary.binary.salt if primary.checksum_ok and primary.binary else None,
        salt_secondary=secondary.binary.salt if secondary.checksum_ok and secondary.binary else None,
        source="secondary" if binary.secondary else "primary",
        needs_repair=not in_sync,
        problems=problems,
    )


def required_span(first_block: bytes, device_size: int) -> int:
    """How many bytes from the device start :func:`read_luks2` needs, judging by the primary's first block."""
    try:
        binary = parse_binary_header(first_block[:BINARY_HEADER_SIZE], secondary=False)
        span = 2 * binary.hdr_size
    except LuksFormatError:
        span = MAX_SPAN
    return min(device_size, span)


def peek_seqid(first_block: bytes) -> tuple[str, int] | None:
    """``(uuid, seqid)`` of the primary copy without checking it, or None: re-read it just before writing,
    and refuse to write if it differs from the header being replaced (someone else updated it)."""
    try:
        binary = parse_binary_header(first_block[:BINARY_HEADER_SIZE], secondary=False)
    except LuksFormatError:
        return None
    return binary.uuid, binary.seqid


def pack_copy(header: Luks2Header, area: bytes, *, seqid: int, secondary: bool, salt: bytes) -> bytes:
    """One header copy (binary header + ``area``) with its checksum; ``area`` is not validated, so tests
    and corpora can wrap any JSON area in a copy whose checksum is right."""
    if len(area) != header.hdr_size - BINARY_HEADER_SIZE or len(salt) != SALT_SIZE:
        raise LuksFormatError(f"JSON area must be {header.hdr_size - BINARY_HEADER_SIZE} bytes, salt {SALT_SIZE}")
    offset = header.hdr_size if secondary else 0
    binary = _BIN.pack(
        MAGIC_SECONDARY if secondary else MAGIC_PRIMARY, VERSION, header.hdr_size, seqid,
        encode_cstring(header.label, 48, "label"), encode_cstring(header.checksum_alg, 32, "checksum_alg"),
        salt, encode_cstring(header.uuid, 40, "uuid"), encode_cstring(header.subsystem, 48, "subsystem"),
        offset, bytes(184), bytes(CSUM_SIZE),
    )  # fmt: skip
    binary += bytes(BINARY_HEADER_SIZE - len(binary))
    csum = _checksum(header.checksum_alg, binary, area)
    return binary[:CSUM_OFFSET] + csum + bytes(CSUM_SIZE - len(csum)) + binary[CSUM_OFFSET + CSUM_SIZE :] + area


def serialize_luks2(
    header: Luks2Header,
    metadata: Luks2Metadata | None = None,
    *,
    seqid: int | None = None,
    rng: RandomSource = os.urandom,
) -> tuple[Write, Write]:
    """Both header copies to write, primary first, carrying ``metadata`` (default: the header's own).

    The seqid is ``header.seqid + 1`` unless given. A copy whose salt is unknown (it was damaged) gets a
    fresh one. Only the header copies are written: keyslot areas are separate writes.
    """
    meta = header.metadata if metadata is None else metadata
    if meta.metadata_size != header.hdr_size:
        raise LuksFormatError(f"metadata json_size {meta.config.json_size} does not fit hdr_size {header.hdr_size}")
    if header.hdr_size not in METADATA_SIZES:
        raise LuksFormatError(f"unsupported LUKS2 header size {header.hdr_size}")
    new_seqid = header.seqid + 1 if seqid is None else seqid
    if not 0 <= new_seqid <= U64_MAX:
        raise LuksFormatError("LUKS2 seqid out of range")
    area = encode_json_area(meta)
    salts = [
        s if s is not None and len(s) == SALT_SIZE else rng(SALT_SIZE)
        for s in (header.salt_primary, header.salt_secondary)
    ]
    return (
        Write(0, pack_copy(header, area, seqid=new_seqid, secondary=False, salt=salts[0])),
        Write(header.hdr_size, pack_copy(header, area, seqid=new_seqid, secondary=True, salt=salts[1])),
    )


def new_header(
    metadata: Luks2Metadata,
    *,
    label: str = "",
    subsystem: str = "",
    uuid: str | None = None,
    rng: RandomSource = os.urandom,
) -> Luks2Header:
    """A header for a new volume (seqid 0: the first write stores seqid 1)."""
    import uuid as uuidlib  # only for new headers: reading one does not pay for it at start-up

    if uuid is not None:
        try:
            uuidlib.UUID(uuid)
        except ValueError as exc:
            raise LuksFormatError(f"{uuid[:40]!r} is not a UUID") from exc
    return Luks2Header(
        metadata=metadata,
        hdr_size=metadata.metadata_size,
        seqid=0,
        uuid=str(uuidlib.UUID(bytes=rng(16), version=4)) if uuid is None else uuid,
        label=label,
        subsystem=subsystem,
        salt_primary=rng(SALT_SIZE),
        salt_secondary=rng(SALT_SIZE),
    )
