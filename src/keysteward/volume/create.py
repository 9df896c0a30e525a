"""Creating a volume: a LUKS2 (or, for QEMU, LUKS1) header and keyslot 0 on a file or block device.

``SIZE`` is the payload. A new file is created sparse (mode 0600) at header plus payload; an existing
regular file is set to exactly that size; a block device must hold it, and a larger one gets a
fixed-size data segment of ``SIZE`` instead of one running to its end. An existing LUKS header is
never overwritten without ``force``.

Everything that can fail (options, KDF memory, label, layout) is checked and the whole header is
built in memory before the device is touched. Writing then zeroes the old metadata region, writes
the keyslot area, and the header last (LUKS2: secondary, then primary), so that an interrupted
create leaves either no volume or a whole one (a complete secondary copy opens on its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from keysteward.crypto.secret import wipe_bytearray
from keysteward.formats import luks
from keysteward.formats.luks.luks2_json import METADATA_SIZES
from keysteward.volume.device import Device
from keysteward.volume.errors import EXISTS, VolumeConflict, option_error
from keysteward.volume.header_io import read_header
from keysteward.volume.kdf import KdfChoice, describe_kdf, new_kdf_params
from keysteward.volume.sizes import MIB, argon2_limit_kib, format_size

LUKS2_DATA_OFFSET = 16 * MIB
LUKS1_ROOM = 16 * MIB
"""More than any LUKS1 header and keyslots need: the device size given to the LUKS1 codec while the
real one (header + payload) is not known yet."""
SECTOR_SIZES = (512, 4096)
KEY_BITS = (256, 512)
ZERO_CHUNK = MIB
LABEL_MAX = 47


@dataclass(frozen=True)
class CreateOptions:
    size: int
    """Payload bytes."""
    sector_size: int = 4096
    key_bits: int = 512
    """256: AES-128-XTS, 512: AES-256-XTS (both halves of the XTS key, as cryptsetup counts)."""
    kdf: KdfChoice = field(default_factory=KdfChoice)
    label: str = ""
    luks1: bool = False
    force: bool = False


@dataclass(frozen=True)
class Created:
    path: str
    version: int
    uuid: str
    keyslot: int
    data_offset: int
    payload_size: int
    sector_size: int
    key_bits: int
    kdf: dict[str, object]
    new_file: bool


def _check(options: CreateOptions) -> None:
    if options.sector_size not in SECTOR_SIZES:
        raise option_error(f"sector size {options.sector_size} is not one of {', '.join(map(str, SECTOR_SIZES))}")
    if options.key_bits not in KEY_BITS:
        raise option_error(f"key size {options.key_bits} is not one of {', '.join(map(str, KEY_BITS))} bits")
    if options.size <= 0 or options.size % options.sector_size:
        raise option_error(
            f"payload size {options.size} must be a positive multiple of the sector size {options.sector_size}"
        )
    if len(options.label.encode("utf-8")) > LABEL_MAX or "\x00" in options.label:
        raise option_error(f"the label must be at most {LABEL_MAX} bytes of UTF-8 without NUL")
    if options.luks1:
        if options.kdf.type not in (None, "pbkdf2"):
            raise option_error("LUKS1 keyslots use pbkdf2 only")
        if options.sector_size != 512:
            raise option_error("LUKS1 volumes have 512-byte sectors (use --sector-size 512 with --luks1)")
        if options.label:
            raise option_error("LUKS1 volumes have no label")


def _new_key(length: int) -> bytearray:
    while True:
        key = bytearray(os.urandom(length))
        if key[: length // 2] != key[length // 2 :]:  # XTS refuses equal halves; 2**-128 odds
            return key


def _open_existing(path: str, force: bool) -> Device | None:
    """The existing file or block device at ``path`` (locked), or None when there is none."""
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise option_error(f"cannot create {path}: {parent} is not a directory")
        return None
    device = Device.open(path, writable=True)
    try:
        if not force and _has_luks_header(device):
            raise VolumeConflict(f"{path} already holds a LUKS volume; pass --force to overwrite it", code=EXISTS)
    except BaseException:
        device.close()
        raise
    return device


def _has_luks_header(device: Device) -> bool:
    """A LUKS primary header at 0, or a LUKS2 secondary copy at one of its possible offsets."""
    if device.pread(0, min(device.size, 6)) == b"LUKS\xba\xbe":
        return True
    offsets = [size for size in METADATA_SIZES if size + 6 <= device.size]
    return any(device.pread(offset, 6) == b"SKUL\xba\xbe" for offset in offsets)


def _luks2_writes(
    key: bytearray, passphrase: bytes | bytearray, options: CreateOptions, params: luks.KdfParams, device_size: int,
    limit: int,
) -> tuple[list[luks.Write], list[luks.Write]]:  # fmt: skip
    formatted = luks.format_luks2(
        key, passphrase, device_size=device_size, kdf_params=params, sector_size=options.sector_size,
        label=options.label, data_offset=LUKS2_DATA_OFFSET, max_memory_kib=limit,
    )  # fmt: skip
    header = formatted.header
    writes = list(formatted.writes)
    if device_size != LUKS2_DATA_OFFSET + options.size:  # a larger block device: a fixed-size segment
        metadata = header.metadata
        segment = replace(metadata.segments[0], size=options.size)
        metadata = luks.validate_metadata(
            replace(metadata, segments=MappingProxyType({0: segment})), device_size=device_size
        )
        primary, secondary = luks.serialize_luks2(replace(header, seqid=0), metadata)
        writes = [w for w in writes if w.offset >= header.hdr_size * 2] + [primary, secondary]
    areas = [w for w in writes if w.offset >= header.hdr_size * 2]
    copies = sorted((w for w in writes if w.offset < header.hdr_size * 2), key=lambda w: -w.offset)
    return areas, copies  # copies: secondary first, primary last


def create_volume(
    path: str, passphrase: bytes | bytearray, options: CreateOptions, *, max_memory_kib: int | None = None
) -> Created:
    """Create a volume at ``path`` whose keyslot 0 opens with ``passphrase`` (see the module doc)."""
    _check(options)
    if not passphrase:
        raise option_error("the passphrase is empty")
    limit = argon2_limit_kib(max_memory_kib)
    params = new_kdf_params(options.kdf, default_type="pbkdf2" if options.luks1 else "argon2id", limit_kib=limit)
    existing = _open_existing(path, options.force)
    device = existing
    key = _new_key(options.key_bits // 8)
    try:
        if options.luks1:
            assert isinstance(params, luks.Pbkdf2Params)
            made1 = luks.format_luks1(
                key, passphrase, device_size=options.size + LUKS1_ROOM, iterations=params.iterations,
                hash_spec=params.hash,
            )  # fmt: skip
            data_offset = made1.header.data_offset
        else:
            data_offset = LUKS2_DATA_OFFSET
        needed = data_offset + options.size
        if existing is not None and existing.is_block and existing.size < needed:
            raise option_error(
                f"{path} has {existing.size} bytes; header and a payload of {format_size(options.size)} need {needed}"
            )
        device_size = existing.size if existing is not None and existing.is_block else needed
        if options.luks1:
            areas, copies = list(made1.writes[:-1]), [made1.writes[-1]]
        else:
            areas, copies = _luks2_writes(key, passphrase, options, params, device_size, limit)
        if existing is None:
            device = Device.create_file(path, needed)
        else:
            _resize_and_zero(existing, needed, max(data_offset, luks.MAX_SPAN))
        assert device is not None
        for write in areas:
            device.pwrite(write.offset, write.data)
        device.fsync()
        for write in copies:
            device.pwrite(write.offset, write.data)
            device.fsync()
        written = read_header(device)
    except BaseException:
        if device is not None:
            device.remove_if_created()
        raise
    finally:
        wipe_bytearray(key)
    device.close()
    return Created(
        path=path, version=written.version, uuid=written.uuid, keyslot=0, data_offset=data_offset,
        payload_size=written.geometry().payload_size, sector_size=options.sector_size, key_bits=options.key_bits,
        kdf=describe_kdf(params), new_file=existing is None,
    )  # fmt: skip


def _resize_and_zero(device: Device, size: int, metadata_end: int) -> None:
    """Set a regular file to ``size`` bytes; zero ``[0, metadata_end)`` (old headers and keyslots)."""
    if not device.is_block and device.size != size:
        try:
            os.ftruncate(device.fd, size)
        except OSError as exc:
            raise option_error(f"cannot set {device.path} to {size} bytes: {exc.strerror}") from exc
        device.size = size
    zeros = bytes(ZERO_CHUNK)
    end = min(metadata_end, device.size)
    for offset in range(0, end, ZERO_CHUNK):
        device.pwrite(offset, zeros[: min(ZERO_CHUNK, end - offset)])
