"""LUKS2 binary headers (keysteward.formats.luks.luks2_header): both copies, checksums, recovery, writes."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from keysteward.errors import BadRequest
from keysteward.formats import luks
from keysteward.formats.luks.errors import CHECKSUM, LuksFormatError

pytestmark = pytest.mark.unit

MIB = 1024 * 1024
DATA_OFFSET = 1 * MIB
DEVICE = DATA_OFFSET + 64 * 1024
HDR = 16384
UUID = "12345678-1234-4234-8234-123456789abc"


def _rng(seed: int = 7) -> luks.RandomSource:
    return random.Random(seed).randbytes


def _apply(size: int, writes: tuple[luks.Write, ...]) -> bytearray:
    image = bytearray(size)
    for write in writes:
        image[write.offset : write.end] = write.data
    return image


@pytest.fixture(scope="module")
def volume() -> tuple[bytes, luks.Formatted, bytes]:
    rng = _rng()
    key = rng(64)
    formatted = luks.format_luks2(
        key, b"pass", device_size=DEVICE, data_offset=DATA_OFFSET, label="disk one", uuid=UUID,
        kdf_params=luks.new_pbkdf2(iterations=1000, rng=rng), rng=rng,
    )  # fmt: skip
    return bytes(_apply(DEVICE, formatted.writes)), formatted, key


def _read(image: bytes | bytearray, device_size: int = DEVICE) -> luks.Luks2Header:
    return luks.read_luks2(bytes(image[: min(len(image), luks.MAX_SPAN)]), device_size=device_size)


def _fix_checksum(image: bytearray, offset: int) -> None:
    hdr_size = struct.unpack_from(">Q", image, offset + 8)[0]
    image[offset + 448 : offset + 512] = bytes(64)
    digest = hashlib.sha256(bytes(image[offset : offset + hdr_size])).digest()
    image[offset + 448 : offset + 448 + 32] = digest


def _code(image: bytes | bytearray, device_size: int = DEVICE) -> str:
    with pytest.raises(LuksFormatError) as info:
        _read(image, device_size)
    assert isinstance(info.value, BadRequest) and info.value.status == 400
    return info.value.code


def test_format_reads_back(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, formatted, _ = volume
    header = _read(image)
    assert (header.source, header.needs_repair, header.problems) == ("primary", False, ())
    assert (header.seqid, header.hdr_size, header.uuid, header.label) == (1, HDR, UUID, "disk one")
    assert header.metadata == formatted.header.metadata
    assert header.metadata.data_offset == DATA_OFFSET
    assert header.metadata.keyslots_offset == 2 * HDR
    assert header.metadata.keyslots_end == DATA_OFFSET
    assert image[:6] == b"LUKS\xba\xbe" and image[HDR : HDR + 6] == b"SKUL\xba\xbe"


def test_reserialize_is_byte_stable(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    header = _read(image)
    primary, secondary = luks.serialize_luks2(header, seqid=header.seqid)
    assert (primary.offset, secondary.offset) == (0, HDR)
    assert primary.data == image[:HDR] and secondary.data == image[HDR : 2 * HDR]


def test_write_increments_seqid_and_keeps_salts(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    header = _read(image)
    changed = bytearray(image)
    for write in luks.serialize_luks2(header):
        changed[write.offset : write.end] = write.data
    again = _read(changed)
    assert again.seqid == header.seqid + 1
    assert (again.salt_primary, again.salt_secondary) == (header.salt_primary, header.salt_secondary)
    assert again.salt_primary != again.salt_secondary


def test_damaged_primary_recovers_from_secondary(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, formatted, _ = volume
    damaged = bytearray(image)
    damaged[4096 + 10] ^= 0x01  # inside the primary JSON area: checksum mismatch
    header = _read(damaged)
    assert header.source == "secondary" and header.needs_repair
    assert any("checksum" in p for p in header.problems)
    assert header.metadata == formatted.header.metadata
    assert header.salt_primary is None
    for write in luks.serialize_luks2(header, rng=_rng(9)):  # writing again repairs the primary
        damaged[write.offset : write.end] = write.data
    repaired = _read(damaged)
    assert (repaired.source, repaired.needs_repair, repaired.seqid) == ("primary", False, header.seqid + 1)


def test_wiped_primary_is_found_by_scanning(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    damaged = bytearray(image)
    damaged[:4096] = bytes(4096)
    header = _read(damaged)
    assert header.source == "secondary" and header.needs_repair


def test_damaged_secondary_uses_primary(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    damaged = bytearray(image)
    damaged[HDR + 5000] ^= 0x80
    header = _read(damaged)
    assert (header.source, header.needs_repair, header.salt_secondary) == ("primary", True, None)


def test_both_copies_damaged_is_a_checksum_error(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    damaged = bytearray(image)
    damaged[4096 + 10] ^= 0x01
    damaged[HDR + 4096 + 10] ^= 0x01
    assert _code(damaged) == CHECKSUM


def test_newer_copy_wins(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    header = _read(image)
    newer = bytearray(image)
    struct.pack_into(">Q", newer, HDR + 16, header.seqid + 5)
    _fix_checksum(newer, HDR)
    chosen = _read(newer)
    assert (chosen.source, chosen.seqid, chosen.needs_repair) == ("secondary", header.seqid + 5, True)
    struct.pack_into(">Q", newer, 16, header.seqid + 6)
    _fix_checksum(newer, 0)
    assert _read(newer).source == "primary"


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0, b"LUKZ"),  # magic
        (6, b"\x00\x03"),  # version
        (8, struct.pack(">Q", 12345)),  # hdr_size not allowed
        (8, struct.pack(">Q", 2**63)),
        (256, struct.pack(">Q", 4096)),  # hdr_offset lies
        (72, b"md5\x00"),  # unsupported checksum algorithm
        (24, b"\xff\xfe\x00"),  # label not UTF-8
    ],
)
def test_bad_binary_fields_in_both_copies(
    volume: tuple[bytes, luks.Formatted, bytes], offset: int, value: bytes
) -> None:
    image, _, _ = volume
    damaged = bytearray(image)
    for base in (0, HDR):
        damaged[base + offset : base + offset + len(value)] = value
        if offset not in (0, 8):
            _fix_checksum(damaged, base)
    _code(damaged)


def test_luks1_and_garbage_are_not_luks2() -> None:
    luks1 = bytearray(2 * MIB)
    luks1[:8] = b"LUKS\xba\xbe\x00\x01"
    assert luks.detect_version(bytes(luks1)) == 1
    assert _code(luks1, 2 * MIB) == "bad_luks_header"
    assert luks.detect_version(bytes(64)) is None
    assert _code(bytes(2 * MIB), 2 * MIB) == "bad_luks_header"


BOUNDARIES = sorted(
    {0, 1, 6, 8, 16, 24, 72, 104, 168, 208, 256, 264, 448, 512, 4095, 4096, 4097, 5000, HDR - 1, HDR, HDR + 1}
    | {HDR + 4096, 2 * HDR - 1, 2 * HDR, 2 * HDR + 1, 2 * HDR + 4096}
)


@pytest.mark.parametrize("length", BOUNDARIES)
def test_truncated_device_at_every_boundary(volume: tuple[bytes, luks.Formatted, bytes], length: int) -> None:
    image, _, _ = volume
    _code(image[:length], max(length, 1))


@pytest.mark.parametrize("length", [l for l in BOUNDARIES if l < 2 * HDR])  # noqa: E741
def test_truncated_read_of_a_whole_device(volume: tuple[bytes, luks.Formatted, bytes], length: int) -> None:
    image, _, _ = volume
    if length < HDR:
        _code(image[:length])
    else:  # the primary is whole: the secondary is missing, which needs repair but reads
        header = _read(image[:length])
        assert header.source == "primary" and header.needs_repair


def test_device_smaller_than_keyslots_area(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    assert _code(image[: DATA_OFFSET - 4096], DATA_OFFSET - 4096) == "bad_luks_header"
    assert _code(image, 3 * HDR) == "bad_luks_header"


def test_more_bytes_than_the_device_has(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    with pytest.raises(LuksFormatError):
        luks.read_luks2(image[: 2 * HDR], device_size=HDR)


def test_peek_seqid_and_required_span(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    assert luks.peek_seqid(image[:4096]) == (UUID, 1)
    assert luks.peek_seqid(bytes(4096)) is None
    assert luks.required_span(image[:4096], DEVICE) == 2 * HDR
    assert luks.required_span(bytes(4096), DEVICE) == DEVICE
    assert luks.required_span(bytes(4096), 100 * MIB) == luks.MAX_SPAN


def test_binary_header_fields(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    image, _, _ = volume
    binary = luks.parse_binary_header(image[HDR : HDR + 4096], secondary=True)
    assert (binary.secondary, binary.hdr_offset, binary.hdr_size, binary.checksum_alg) == (True, HDR, HDR, "sha256")
    assert len(binary.salt) == 64 and len(binary.checksum) == 64
    with pytest.raises(LuksFormatError):
        luks.parse_binary_header(image[HDR : HDR + 4096], secondary=False)


@pytest.mark.parametrize(
    "change", [{"label": "x" * 48}, {"uuid": "u" * 40}, {"subsystem": "a\x00b"}, {"hdr_size": 5000}, {"seqid": -1}]
)
def test_serialize_refuses_bad_fields(volume: tuple[bytes, luks.Formatted, bytes], change: dict[str, object]) -> None:
    import dataclasses

    image, _, _ = volume
    header = _read(image)
    seqid = change.pop("seqid", None)
    with pytest.raises(LuksFormatError):
        luks.serialize_luks2(dataclasses.replace(header, **change), seqid=seqid)  # type: ignore[arg-type]


def test_new_header_refuses_a_bad_uuid(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    _, formatted, _ = volume
    with pytest.raises(LuksFormatError):
        luks.new_header(formatted.header.metadata, uuid="not-a-uuid")


def test_metadata_that_outgrows_the_json_area(volume: tuple[bytes, luks.Formatted, bytes]) -> None:
    import dataclasses

    image, _, _ = volume
    header = _read(image)
    big = luks.Luks2Token("big", (), {"type": "big", "keyslots": [], "blob": "x" * HDR})
    meta = dataclasses.replace(header.metadata, tokens={0: big})
    with pytest.raises(LuksFormatError, match="JSON area"):
        luks.serialize_luks2(header, meta)


def test_write_repr_hides_bytes() -> None:
    assert repr(luks.Write(5, b"secret")) == "Write(offset=5, length=6)"
