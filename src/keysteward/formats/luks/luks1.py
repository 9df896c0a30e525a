"""LUKS1: the 592-byte phdr, its eight keyslots, open and create (what QEMU reads and writes).

On disk, big-endian; offsets in 512-byte sectors::

    0    magic                 6   "LUKS\\xba\\xbe"
    6    version               2   1
    8    cipher_name           32  "aes"
    40   cipher_mode           32  "xts-plain64"
    72   hash_spec             32  "sha256" (PBKDF2, AF and digest hash)
    104  payload_offset        4   sectors
    108  key_bytes             4   volume key size
    112  mk_digest             20  PBKDF2(hash, volume key, salt, iterations, 20)
    132  mk_digest_salt        32
    164  mk_digest_iterations  4
    168  uuid                  40
    208  8 x keyslot           48  active (0x00AC71F3 on, 0x0000DEAD off), iterations, salt[32],
                                   key_material_offset (sectors), stripes (4000)

A keyslot's material (``key_bytes * 4000`` bytes, sector-rounded) is encrypted with the volume's own
cipher spec under ``PBKDF2(hash, passphrase, salt, iterations, key_bytes)``, IV 0 at its start.
cryptsetup writes the header as 1024 bytes (592 + zero padding); the first keyslot starts at 4096.
"""

from __future__ import annotations

import hmac
import itertools
import os
import struct
import uuid as uuidlib
from dataclasses import dataclass, replace

from keysteward.formats.luks.afsplit import STRIPES, af_merge, af_sectors, af_size, af_split
from keysteward.formats.luks.areacipher import AreaCipher, check_area_encryption, xts_area_cipher
from keysteward.formats.luks.common import RandomSource, Write, cstring, encode_cstring
from keysteward.formats.luks.errors import FULL, LuksFormatError, LuksWrongPassphrase, unsupported
from keysteward.formats.luks.hashes import pbkdf2
from keysteward.formats.luks.kdf import SALT_SIZE, Kdf, Pbkdf2Params, derive_key
from keysteward.formats.luks.keyslot import Reader, Unlocked

MAGIC = b"LUKS\xba\xbe"
PHDR_SIZE = 592
HEADER_WRITE_SIZE = 1024
KEY_ENABLED = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD
NUM_KEYS = 8
DIGEST_SIZE = 20
SECTOR = 512
KEYSLOT_ALIGN_SECTORS = 8
KEYSLOTS_START = 4096
MAX_KEY_BYTES = 512

_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")


@dataclass(frozen=True)
class Luks1Keyslot:
    active: bool
    iterations: int
    salt: bytes
    key_material_offset: int
    """In 512-byte sectors."""
    stripes: int = STRIPES


@dataclass(frozen=True)
class Luks1Header:
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int
    """In 512-byte sectors."""
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iterations: int
    uuid: str
    keyslots: tuple[Luks1Keyslot, ...]

    @property
    def encryption(self) -> str:
        """The cipher spec, as LUKS2 would write it: ``aes-xts-plain64``."""
        return f"{self.cipher_name}-{self.cipher_mode}"

    @property
    def data_offset(self) -> int:
        """Byte offset of the payload (its IVs start at 0 there, 512-byte sectors)."""
        return self.payload_offset * SECTOR

    def keyslot_span(self, slot: int) -> tuple[int, int]:
        """``(offset, length)`` in bytes of keyslot ``slot``'s material."""
        if not 0 <= slot < NUM_KEYS:
            raise LuksFormatError(f"LUKS1 keyslot {slot} is out of range 0..7")
        return self.keyslots[slot].key_material_offset * SECTOR, af_size(self.key_bytes, STRIPES)


def _ascii(raw: bytes, what: str) -> str:
    text = cstring(raw, what)
    if not text.isascii() or not text.isprintable():
        raise LuksFormatError(f"LUKS1 header field {what} is not printable ASCII")
    return text


def parse_luks1(data: bytes, *, device_size: int) -> Luks1Header:
    """Parse and check a LUKS1 header from the device's first bytes (at least 592)."""
    if len(data) < PHDR_SIZE:
        raise LuksFormatError(f"LUKS1 header is truncated ({len(data)} of {PHDR_SIZE} bytes)")
    magic, version, name, mode, hash_spec, payload, key_bytes, digest, salt, iterations, uuid = _PHDR.unpack_from(data)
    if magic != MAGIC:
        raise LuksFormatError("not a LUKS volume (wrong magic)")
    if version != 1:
        raise LuksFormatError(f"LUKS header version {version} is not 1")
    slots = []
    for i in range(NUM_KEYS):
        active, slot_iterations, slot_salt, offset, stripes = _SLOT.unpack_from(data, _PHDR.size + i * _SLOT.size)
        if active not in (KEY_ENABLED, KEY_DISABLED):
            raise LuksFormatError(f"LUKS1 keyslot {i} has an invalid state 0x{active:08x}")
        if active == KEY_ENABLED and slot_iterations < 1:
            raise LuksFormatError(f"LUKS1 keyslot {i} has no iterations")
        if stripes != STRIPES:
            raise LuksFormatError(f"LUKS1 keyslot {i} has {stripes} stripes, LUKS1 uses {STRIPES}")
        slots.append(Luks1Keyslot(active == KEY_ENABLED, slot_iterations, slot_salt, offset, stripes))
    header = Luks1Header(
        _ascii(name, "cipher_name"), _ascii(mode, "cipher_mode"), _ascii(hash_spec, "hash_spec"), payload, key_bytes,
        digest, salt, iterations, _ascii(uuid, "uuid"), tuple(slots),
    )  # fmt: skip
    _check(header, device_size)
    return header


def _check(header: Luks1Header, device_size: int) -> None:
    if not header.cipher_name or not header.cipher_mode or not header.hash_spec:
        raise LuksFormatError("LUKS1 header has an empty cipher or hash name")
    if not 1 <= header.key_bytes <= MAX_KEY_BYTES:
        raise LuksFormatError(f"LUKS1 key size {header.key_bytes} bytes is out of range 1..{MAX_KEY_BYTES}")
    if header.mk_digest_iterations < 1:
        raise LuksFormatError("LUKS1 volume key digest has no iterations")
    if header.payload_offset == 0:
        raise unsupported("LUKS1 with a detached header (payload offset 0) is not supported")
    sectors = af_sectors(header.key_bytes)
    spans = sorted((s.key_material_offset, i) for i, s in enumerate(header.keyslots))
    for offset, i in spans:
        if offset * SECTOR < HEADER_WRITE_SIZE:
            raise LuksFormatError(f"LUKS1 keyslot {i} at sector {offset} overlaps the header")
        if offset + sectors > header.payload_offset:
            raise LuksFormatError(f"LUKS1 keyslot {i} (sectors {offset}..{offset + sectors}) runs into the payload")
    for (first, i), (second, j) in itertools.pairwise(spans):
        if second < first + sectors:
            raise LuksFormatError(f"LUKS1 keyslots {i} and {j} overlap")
    if header.data_offset > device_size:
        raise LuksFormatError(f"LUKS1 payload offset {header.data_offset} is beyond the device ({device_size} bytes)")


def serialize_luks1(header: Luks1Header) -> Write:
    """The header to write at offset 0 (1024 bytes: the phdr and zero padding, as cryptsetup writes it)."""
    if len(header.keyslots) != NUM_KEYS:
        raise LuksFormatError(f"LUKS1 has {NUM_KEYS} keyslots, not {len(header.keyslots)}")
    if len(header.mk_digest) != DIGEST_SIZE or len(header.mk_digest_salt) != SALT_SIZE:
        raise LuksFormatError("LUKS1 digest or digest salt has the wrong size")
    try:
        out = _PHDR.pack(
            MAGIC, 1, encode_cstring(header.cipher_name, 32, "cipher_name"),
            encode_cstring(header.cipher_mode, 32, "cipher_mode"), encode_cstring(header.hash_spec, 32, "hash_spec"),
            header.payload_offset, header.key_bytes, header.mk_digest, header.mk_digest_salt,
            header.mk_digest_iterations, encode_cstring(header.uuid, 40, "uuid"),
        )  # fmt: skip
        for slot in header.keyslots:
            if len(slot.salt) != SALT_SIZE:
                raise LuksFormatError("LUKS1 keyslot salt has the wrong size")
            state = KEY_ENABLED if slot.active else KEY_DISABLED
            out += _SLOT.pack(state, slot.iterations, slot.salt, slot.key_material_offset, slot.stripes)
    except struct.error as exc:
        raise LuksFormatError(f"LUKS1 header field out of range: {exc}") from exc
    return Write(0, out + bytes(HEADER_WRITE_SIZE - len(out)))


# -- keyslots ---------------------------------------------------------------------------------------


def verify_luks1_key(header: Luks1Header, volume_key: bytes | bytearray) -> None:
    """Raise :class:`LuksWrongPassphrase` unless ``volume_key`` matches the header's digest."""
    value = pbkdf2(header.hash_spec, volume_key, header.mk_digest_salt, header.mk_digest_iterations, DIGEST_SIZE)
    matches = hmac.compare_digest(bytes(value), header.mk_digest)
    value[:] = bytes(len(value))
    if not matches:
        raise LuksWrongPassphrase("the key does not match the LUKS1 volume key digest")


def open_luks1_keyslot(
    header: Luks1Header,
    slot: int,
    material: bytes,
    passphrase: bytes | bytearray,
    *,
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
) -> bytearray:
    """The volume key from keyslot ``slot`` (``material``: the bytes of :meth:`Luks1Header.keyslot_span`)."""
    _, length = header.keyslot_span(slot)
    keyslot = header.keyslots[slot]
    if not keyslot.active:
        raise LuksFormatError(f"LUKS1 keyslot {slot} is disabled")
    if len(material) < length:
        raise LuksFormatError(f"LUKS1 keyslot material is {len(material)} bytes, {length} needed")
    check_area_encryption(header.encryption, header.key_bytes)
    derive = kdf if kdf is not None else derive_key
    area_key = derive(Pbkdf2Params(header.hash_spec, keyslot.iterations, keyslot.salt), passphrase, header.key_bytes)
    try:
        plain = bytearray(cipher(header.encryption, area_key, material[:length], True))
    finally:
        area_key[:] = bytes(len(area_key))
    key = af_merge(plain, header.key_bytes, header.hash_spec, STRIPES)
    plain[:] = bytes(len(plain))
    try:
        verify_luks1_key(header, key)
    except BaseException:
        key[:] = bytes(len(key))
        raise
    return key


def unlock_luks1(
    header: Luks1Header,
    read: Reader,
    passphrase: bytes | bytearray,
    *,
    keyslot: int | None = None,
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
) -> Unlocked:
    """Try each active keyslot (or only ``keyslot``); ``Unlocked.digest`` is always 0 for LUKS1."""
    slots = [keyslot] if keyslot is not None else [i for i, s in enumerate(header.keyslots) if s.active]
    for slot in slots:
        offset, length = header.keyslot_span(slot)
        try:
            key = open_luks1_keyslot(header, slot, read(offset, length), passphrase, kdf=kdf, cipher=cipher)
        except LuksWrongPassphrase:
            continue
        return Unlocked(slot, 0, key)
    raise LuksWrongPassphrase("no LUKS1 keyslot opens with this passphrase")


def set_luks1_keyslot(
    header: Luks1Header,
    volume_key: bytes | bytearray,
    passphrase: bytes | bytearray,
    *,
    slot: int | None = None,
    iterations: int = 1000,
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
    rng: RandomSource = os.urandom,
) -> tuple[Luks1Header, Write]:
    """``header`` with ``volume_key`` stored under ``passphrase`` in ``slot`` (default: first disabled one),
    and the write of its encrypted material. The key must match the header's digest."""
    verify_luks1_key(header, volume_key)
    if slot is None:
        slot = next((i for i, s in enumerate(header.keyslots) if not s.active), -1)
        if slot < 0:
            raise LuksFormatError("all 8 LUKS1 keyslots are in use", code=FULL)
    offset, length = header.keyslot_span(slot)
    if header.keyslots[slot].active:
        raise LuksFormatError(f"LUKS1 keyslot {slot} is in use")
    check_area_encryption(header.encryption, header.key_bytes)
    params = Pbkdf2Params(header.hash_spec, iterations, rng(SALT_SIZE))
    split = af_split(volume_key, header.hash_spec, rng=rng)
    split += bytes(length - len(split))
    area_key = (kdf if kdf is not None else derive_key)(params, passphrase, header.key_bytes)
    try:
        encrypted = cipher(header.encryption, area_key, bytes(split), False)
    finally:
        area_key[:] = bytes(len(area_key))
        split[:] = bytes(len(split))
    slots = list(header.keyslots)
    slots[slot] = Luks1Keyslot(True, iterations, params.salt, slots[slot].key_material_offset)
    return replace(header, keyslots=tuple(slots)), Write(offset, encrypted)


def remove_luks1_keyslot(header: Luks1Header, slot: int) -> tuple[Luks1Header, Write]:
    """``header`` with keyslot ``slot`` disabled, and the write that wipes its material."""
    offset, length = header.keyslot_span(slot)
    slots = list(header.keyslots)
    slots[slot] = Luks1Keyslot(False, 0, bytes(SALT_SIZE), slots[slot].key_material_offset)
    return replace(header, keyslots=tuple(slots)), Write(offset, bytes(length))


@dataclass(frozen=True)
class Luks1Formatted:
    header: Luks1Header
    writes: tuple[Write, ...]


def format_luks1(
    volume_key: bytes | bytearray,
    passphrase: bytes | bytearray,
    *,
    device_size: int,
    cipher_name: str = "aes",
    cipher_mode: str = "xts-plain64",
    hash_spec: str = "sha256",
    iterations: int = 1000,
    digest_iterations: int = 1000,
    uuid: str | None = None,
    align_sectors: int = 2048,
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
    rng: RandomSource = os.urandom,
) -> Luks1Formatted:
    """A new LUKS1 volume laid out like cryptsetup's: keyslots from sector 8, each 4 KiB aligned, the
    payload aligned to ``align_sectors`` (1 MiB). Keyslot 0 holds ``volume_key`` under ``passphrase``."""
    key_bytes = len(volume_key)
    check_area_encryption(f"{cipher_name}-{cipher_mode}", key_bytes)
    offsets: list[int] = []
    next_sector = KEYSLOTS_START // SECTOR
    for _ in range(NUM_KEYS):
        offsets.append(next_sector)
        next_sector += af_sectors(key_bytes)
        next_sector = (next_sector + KEYSLOT_ALIGN_SECTORS - 1) // KEYSLOT_ALIGN_SECTORS * KEYSLOT_ALIGN_SECTORS
    if align_sectors < 1:
        raise LuksFormatError("payload alignment must be at least one sector")
    payload = (next_sector + align_sectors - 1) // align_sectors * align_sectors
    if payload * SECTOR >= device_size:
        raise LuksFormatError(f"device of {device_size} bytes has no room for data after {payload * SECTOR}")
    if uuid is None:
        uuid = str(uuidlib.UUID(bytes=rng(16), version=4))
    salt = rng(SALT_SIZE)
    digest = pbkdf2(hash_spec, volume_key, salt, digest_iterations, DIGEST_SIZE)
    header = Luks1Header(
        cipher_name, cipher_mode, hash_spec, payload, key_bytes, bytes(digest), salt, digest_iterations, uuid,
        tuple(Luks1Keyslot(False, 0, bytes(SALT_SIZE), o) for o in offsets),
    )  # fmt: skip
    _check(header, device_size)
    header, area = set_luks1_keyslot(
        header, volume_key, passphrase, slot=0, iterations=iterations, kdf=kdf, cipher=cipher, rng=rng
    )
    return Luks1Formatted(header, (area, serialize_luks1(header)))
