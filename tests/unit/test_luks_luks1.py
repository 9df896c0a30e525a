"""LUKS1 (keysteward.formats.luks.luks1): phdr parse / serialize, keyslots, format, damaged headers."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.formats import luks
from keysteward.formats.luks.errors import FULL, UNSUPPORTED, LuksFormatError

pytestmark = pytest.mark.unit

MIB = 1024 * 1024
DEVICE = 3 * MIB


@pytest.fixture(scope="module")
def volume() -> tuple[bytes, luks.Luks1Header, bytes]:
    rng = random.Random(11).randbytes
    key = rng(64)
    formatted = luks.format_luks1(key, b"pass", device_size=DEVICE, rng=rng)
    image = bytearray(DEVICE)
    for write in formatted.writes:
        image[write.offset : write.end] = write.data
    return bytes(image), formatted.header, key


def _parse(image: bytes | bytearray) -> luks.Luks1Header:
    return luks.parse_luks1(bytes(image[:4096]), device_size=DEVICE)


def test_layout_like_cryptsetup(volume: tuple[bytes, luks.Luks1Header, bytes]) -> None:
    image, header, _ = volume
    assert _parse(image) == header
    assert (header.cipher_name, header.cipher_mode, header.hash_spec) == ("aes", "xts-plain64", "sha256")
    assert header.encryption == "aes-xts-plain64"
    assert [s.key_material_offset for s in header.keyslots] == [8 + 504 * i for i in range(8)]
    assert (header.payload_offset, header.data_offset, header.key_bytes) == (4096, 2 * MIB, 64)
    assert [s.active for s in header.keyslots] == [True] + [False] * 7
    assert luks.serialize_luks1(header).data == image[:1024]
    assert luks.detect_version(image) == 1


def test_unlock_and_wrong_passphrase(volume: tuple[bytes, luks.Luks1Header, bytes]) -> None:
    image, header, key = volume

    def read(offset: int, length: int) -> bytes:
        return image[offset : offset + length]

    unlocked = luks.unlock_luks1(header, read, b"pass")
    assert (unlocked.keyslot, bytes(unlocked.volume_key)) == (0, key)
    with pytest.raises(luks.LuksWrongPassphrase):
        luks.unlock_luks1(header, read, b"nope")
    with pytest.raises(LuksFormatError):
        luks.unlock_luks1(header, lambda o, n: b"", b"pass")
    with pytest.raises(LuksFormatError):
        luks.open_luks1_keyslot(header, 3, read(*header.keyslot_span(3)), b"pass")  # disabled


def test_add_and_remove_keyslots(volume: tuple[bytes, luks.Luks1Header, bytes]) -> None:
    image, header, key = volume
    work = bytearray(image)
    header, write = luks.set_luks1_keyslot(header, key, b"second", rng=random.Random(1).randbytes)
    work[write.offset : write.end] = write.data
    work[:1024] = luks.serialize_luks1(header).data
    header = _parse(work)
    assert [s.active for s in header.keyslots[:3]] == [True, True, False]

    def read(offset: int, length: int) -> bytes:
        return bytes(work[offset : offset + length])

    assert luks.unlock_luks1(header, read, b"second").keyslot == 1
    with pytest.raises(luks.LuksWrongPassphrase):
        luks.set_luks1_keyslot(header, bytes(64), b"x")  # not the volume key
    with pytest.raises(LuksFormatError):
        luks.set_luks1_keyslot(header, key, b"x", slot=0)  # in use
    removed, wipe = luks.remove_luks1_keyslot(header, 1)
    assert wipe.data == bytes(256000) and not removed.keyslots[1].active
    full = header
    for _ in range(6):
        full, _ = luks.set_luks1_keyslot(full, key, b"x", iterations=1000)
    with pytest.raises(LuksFormatError) as info:
        luks.set_luks1_keyslot(full, key, b"x")
    assert info.value.code == FULL


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0, b"LUKZ"),
        (6, struct.pack(">H", 2)),
        (104, struct.pack(">I", 0)),  # detached header: unsupported
        (104, struct.pack(">I", 100)),  # payload before the keyslots end
        (104, struct.pack(">I", 0xFFFFFFFF)),  # payload beyond the device
        (108, struct.pack(">I", 0)),  # key bytes
        (108, struct.pack(">I", 4096)),
        (164, struct.pack(">I", 0)),  # digest iterations
        (208, struct.pack(">I", 0xCAFE)),  # slot state
        (208 + 40, struct.pack(">I", 1)),  # keyslot 0 material inside the header
        (208 + 48 + 40, struct.pack(">I", 8)),  # keyslot 1 overlaps keyslot 0
        (208 + 44, struct.pack(">I", 3999)),  # stripes
        (208 + 4, struct.pack(">I", 0)),  # active keyslot without iterations
        (8, b"\xff\xfe"),  # cipher name not ASCII
        (8, bytes(32)),  # empty cipher name
    ],
)
def test_damaged_fields(volume: tuple[bytes, luks.Luks1Header, bytes], offset: int, value: bytes) -> None:
    image, _, _ = volume
    damaged = bytearray(image[:4096])
    damaged[offset : offset + len(value)] = value
    with pytest.raises(LuksFormatError) as info:
        _parse(damaged)
    assert info.value.code in ("bad_luks_header", UNSUPPORTED)


def test_truncated_and_unknown_hash(volume: tuple[bytes, luks.Luks1Header, bytes]) -> None:
    image, header, _ = volume
    for length in (0, 6, 100, 207, 591):
        with pytest.raises(LuksFormatError):
            luks.parse_luks1(image[:length], device_size=DEVICE)
    odd = dataclasses.replace(header, hash_spec="whirlpool")
    with pytest.raises(LuksFormatError) as info:
        luks.unlock_luks1(odd, lambda o, n: image[o : o + n], b"pass")
    assert info.value.code == UNSUPPORTED


def test_serialize_refuses_bad_fields(volume: tuple[bytes, luks.Luks1Header, bytes]) -> None:
    _, header, _ = volume
    for change in ({"cipher_name": "a" * 32}, {"mk_digest": b"x"}, {"keyslots": ()}, {"payload_offset": 2**32}):
        with pytest.raises(LuksFormatError):
            luks.serialize_luks1(dataclasses.replace(header, **change))


def test_format_refuses_small_devices_and_other_ciphers() -> None:
    with pytest.raises(LuksFormatError):
        luks.format_luks1(bytes(range(64)), b"p", device_size=MIB)
    with pytest.raises(LuksFormatError):
        luks.format_luks1(bytes(range(32)), b"p", device_size=DEVICE, cipher_mode="cbc-essiv:sha256")


@settings(max_examples=200, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 591), st.integers(1, 255)), min_size=1, max_size=6))
def test_fuzz_phdr_flips(volume: tuple[bytes, luks.Luks1Header, bytes], flips: list[tuple[int, int]]) -> None:
    image, _, _ = volume
    damaged = bytearray(image[:4096])
    for offset, mask in flips:
        damaged[offset] ^= mask
    try:
        header = _parse(damaged)
    except LuksFormatError:
        return
    if header.mk_digest_iterations > 10_000 or any(s.iterations > 10_000 for s in header.keyslots):
        return  # parses; opening it would just burn CPU
    try:
        luks.unlock_luks1(header, lambda o, n: image[o : o + n], b"pass")
    except (LuksFormatError, luks.LuksWrongPassphrase):
        pass


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=0, max_size=1200))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        luks.parse_luks1(b"LUKS\xba\xbe\x00\x01" + data, device_size=DEVICE)
    except LuksFormatError:
        pass
