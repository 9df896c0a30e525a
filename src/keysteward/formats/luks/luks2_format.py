"""A new LUKS2 volume as bytes: header copies and the first keyslot, the way cryptsetup lays them out.

Layout (defaults as ``cryptsetup luksFormat --type luks2``): two 16 KiB header copies, the keyslots
area up to the data offset (16 MiB), one ``crypt`` segment of ``aes-xts-plain64`` from the data offset
to the end of the device (``"dynamic"``), a ``pbkdf2`` digest over the volume key, keyslot 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from keysteward.formats.luks.areacipher import AreaCipher, check_area_encryption, xts_area_cipher
from keysteward.formats.luks.common import RandomSource, Write
from keysteward.formats.luks.errors import LuksFormatError
from keysteward.formats.luks.kdf import DEFAULT_MAX_MEMORY_KIB, Kdf, KdfParams, new_pbkdf2
from keysteward.formats.luks.keyslot import add_keyslot, allocate_area, make_digest, make_keyslot
from keysteward.formats.luks.luks2_header import Luks2Header, new_header, serialize_luks2
from keysteward.formats.luks.luks2_json import METADATA_SIZES, SECTOR_SIZES, validate_metadata
from keysteward.formats.luks.luks2_model import BINARY_HEADER_SIZE, Luks2Config, Luks2Metadata, Luks2Segment, frozen_map

DEFAULT_DATA_OFFSET = 16 * 1024 * 1024


@dataclass(frozen=True)
class Formatted:
    """What to write for a new volume: the header (as it will read back) and the writes, in order."""

    header: Luks2Header
    keyslot: int
    writes: tuple[Write, ...]


def format_luks2(
    volume_key: bytes | bytearray,
    passphrase: bytes | bytearray,
    *,
    device_size: int,
    kdf_params: KdfParams | None = None,
    sector_size: int = 512,
    label: str = "",
    subsystem: str = "",
    uuid: str | None = None,
    encryption: str = "aes-xts-plain64",
    metadata_size: int = METADATA_SIZES[0],
    data_offset: int = DEFAULT_DATA_OFFSET,
    digest_iterations: int = 1000,
    digest_hash: str = "sha256",
    af_hash: str = "sha256",
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
    max_memory_kib: int = DEFAULT_MAX_MEMORY_KIB,
    rng: RandomSource = os.urandom,
) -> Formatted:
    """Header copies plus keyslot 0 for a new LUKS2 volume on a device of ``device_size`` bytes.

    The caller should zero ``[0, data_offset)`` first (old headers and keyslots), then apply ``writes``.
    """
    check_area_encryption(encryption, len(volume_key))
    if sector_size not in SECTOR_SIZES:
        raise LuksFormatError(f"sector size {sector_size} is not one of {SECTOR_SIZES}")
    if metadata_size not in METADATA_SIZES:
        raise LuksFormatError(f"header size {metadata_size} is not one of {METADATA_SIZES}")
    keyslots_size = data_offset - 2 * metadata_size
    if data_offset % 4096 or keyslots_size <= 0:
        raise LuksFormatError(f"data offset {data_offset} is not 4 KiB aligned or leaves no room for keyslots")
    payload = device_size - data_offset
    if payload < sector_size:
        raise LuksFormatError(f"device of {device_size} bytes has no room for data after {data_offset}")
    kdf_params = kdf_params if kdf_params is not None else new_pbkdf2(rng=rng)
    digest = make_digest(volume_key, segments=(0,), hash=digest_hash, iterations=digest_iterations, rng=rng)
    metadata = Luks2Metadata(
        keyslots=frozen_map(),
        tokens=frozen_map(),
        segments=frozen_map({0: Luks2Segment(data_offset, None, encryption, sector_size)}),
        digests=frozen_map({0: digest}),
        config=Luks2Config(metadata_size - BINARY_HEADER_SIZE, min(keyslots_size, 0x8000000)),
    )
    offset, size = allocate_area(metadata, len(volume_key))
    keyslot, area_write = make_keyslot(
        volume_key, passphrase, kdf_params=kdf_params, area_offset=offset, area_size=size, encryption=encryption,
        af_hash=af_hash, kdf=kdf, cipher=cipher, max_memory_kib=max_memory_kib, rng=rng,
    )  # fmt: skip
    slot, metadata = add_keyslot(metadata, keyslot, keyslot_id=0, digest_id=0)
    validate_metadata(metadata, device_size=device_size)
    header = new_header(metadata, label=label, subsystem=subsystem, uuid=uuid, rng=rng)
    primary, secondary = serialize_luks2(header)
    written = replace(header, seqid=1)
    return Formatted(written, slot, (area_write, primary, secondary))
