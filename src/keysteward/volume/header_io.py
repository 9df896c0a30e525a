"""Reading a volume's LUKS1 or LUKS2 header from a device, and writing changes back crash-safely.

Reading takes the device's first block, tells LUKS1 from LUKS2 by the primary's magic and version
(anything else goes to the LUKS2 reader, which finds a secondary copy behind a damaged primary), and
hands the codec exactly the span it needs.

Writing (:func:`commit_luks2`, :func:`commit_luks1`) first checks that the header on disk is still the
one that was read (LUKS2: the primary's uuid and seqid, ``peek_seqid``; LUKS1: its bytes), then
writes in an order where a SIGKILL or power cut at any point leaves a header that opens with every
passphrase that opened it before:

1. the ``before`` writes (a new keyslot's area, which no current keyslot uses; or the wipe of a
   keyslot being removed, which other keyslots do not need), then fsync;
2. LUKS2: the secondary copy, fsync, then the primary copy, fsync. Until the secondary is complete
   the primary is the valid, older copy; once it is, it is the newer valid one, whatever happens to
   the primary after. LUKS1 has one header: it is written in one 1 KiB write, fsynced;
3. the ``after`` writes, fsync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keysteward.formats import luks
from keysteward.formats.luks.errors import unsupported
from keysteward.volume.device import Device
from keysteward.volume.errors import CHANGED, VolumeConflict

FIRST_BLOCK = 4096
LUKS1_HEADER_BYTES = 1024
DATA_CIPHERS = ("aes-xts-plain64",)
IV_UNIT = 512
TWEAK_LIMIT = 1 << 64


@dataclass(frozen=True)
class Geometry:
    """Where the encrypted payload is and how its sectors are encrypted."""

    data_offset: int
    payload_size: int
    sector_size: int
    iv_tweak: int
    encryption: str
    key_size: int


@dataclass(frozen=True)
class VolumeHeader:
    """A LUKS1 or LUKS2 header as read from a device of ``device_size`` bytes."""

    device_size: int
    luks2: luks.Luks2Header | None = None
    luks1: luks.Luks1Header | None = None
    stamp: object = None
    """What :func:`commit_luks2` / :func:`commit_luks1` compare against the disk before writing."""

    @property
    def version(self) -> int:
        return 2 if self.luks2 is not None else 1

    @property
    def uuid(self) -> str:
        return self.luks2.uuid if self.luks2 is not None else self.v1.uuid

    @property
    def v1(self) -> luks.Luks1Header:
        assert self.luks1 is not None
        return self.luks1

    @property
    def v2(self) -> luks.Luks2Header:
        assert self.luks2 is not None
        return self.luks2

    def keyslot_ids(self) -> list[int]:
        if self.luks2 is not None:
            return list(self.luks2.metadata.keyslots)
        return [n for n, slot in enumerate(self.v1.keyslots) if slot.active]

    def geometry(self) -> Geometry:
        """The payload's layout; raises ``luks_unsupported`` for what the data path cannot serve."""
        if self.luks1 is not None:
            header = self.luks1
            usable = max(0, self.device_size - header.data_offset)
            geometry = Geometry(header.data_offset, usable - usable % 512, 512, 0, header.encryption, header.key_bytes)
        else:
            metadata = self.v2.metadata
            if len(metadata.segments) != 1:
                raise unsupported(f"volumes with {len(metadata.segments)} data segments are not supported")
            segment = next(iter(metadata.segments.values()))
            if segment.integrity is not None:
                raise unsupported("data segments with integrity protection (dm-integrity) are not supported")
            key_size = next((k.key_size for k in metadata.keyslots.values()), 0)
            geometry = Geometry(
                segment.offset, segment.payload_size(self.device_size), segment.sector_size, segment.iv_tweak,
                segment.encryption, key_size,
            )  # fmt: skip
        if geometry.encryption.lower() not in DATA_CIPHERS:
            raise unsupported(f"data encryption {geometry.encryption!r} is not supported (only aes-xts-plain64)")
        if geometry.iv_tweak + geometry.payload_size // IV_UNIT >= TWEAK_LIMIT:
            raise unsupported(f"iv_tweak {geometry.iv_tweak} makes the payload's sector numbers overflow 64 bits")
        return geometry


def _first_block(device: Device) -> bytes:
    return device.pread(0, min(device.size, FIRST_BLOCK))


def read_header(device: Device) -> VolumeHeader:
    """The volume header of ``device``; raises :class:`~keysteward.formats.luks.LuksFormatError`."""
    first = _first_block(device)
    if luks.detect_version(first) == 1:
        header1 = luks.parse_luks1(first, device_size=device.size)
        return VolumeHeader(device.size, luks1=header1, stamp=first[:LUKS1_HEADER_BYTES])
    span = luks.required_span(first, device.size)
    data = first if span <= len(first) else device.pread(0, span)
    header2 = luks.read_luks2(data, device_size=device.size)
    return VolumeHeader(device.size, luks2=header2, stamp=luks.peek_seqid(first))


def _check_unchanged(device: Device, header: VolumeHeader) -> None:
    first = _first_block(device)
    now: object = first[:LUKS1_HEADER_BYTES] if header.luks1 is not None else luks.peek_seqid(first)
    if now != header.stamp:
        raise VolumeConflict(
            f"the LUKS header of {device.path} changed after keysteward read it; nothing was written, try again",
            code=CHANGED,
        )


def _apply(device: Device, writes: Sequence[luks.Write]) -> None:
    for write in writes:
        device.pwrite(write.offset, write.data)
    if writes:
        device.fsync()


def commit_luks2(
    device: Device,
    header: VolumeHeader,
    metadata: luks.Luks2Metadata,
    *,
    before: Sequence[luks.Write] = (),
    after: Sequence[luks.Write] = (),
) -> VolumeHeader:
    """Write ``metadata`` as the next header of a LUKS2 volume (order: see the module doc); returns the
    header read back from the device."""
    primary, secondary = luks.serialize_luks2(header.v2, metadata)  # pure: fails before any write
    _check_unchanged(device, header)
    _apply(device, before)
    _apply(device, [secondary])
    _apply(device, [primary])
    _apply(device, after)
    return read_header(device)


def commit_luks1(
    device: Device,
    header: VolumeHeader,
    new: luks.Luks1Header,
    *,
    before: Sequence[luks.Write] = (),
    after: Sequence[luks.Write] = (),
) -> VolumeHeader:
    """Write ``new`` as the header of a LUKS1 volume (order: see the module doc)."""
    write = luks.serialize_luks1(new)
    _check_unchanged(device, header)
    _apply(device, before)
    _apply(device, [write])
    _apply(device, after)
    return read_header(device)
