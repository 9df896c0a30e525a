"""The envelope ciphertext blob (keysteward.formats.ciphertext): every bad input is an InvalidCiphertext."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.errors import BadRequest, InvalidCiphertext
from keysteward.formats import ciphertext as codec
from keysteward.formats.ciphertext import CiphertextBlob

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=300, deadline=None)

KEY_ID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
SEALED = bytes(range(12)) + b"ciphertext" + bytes(range(100, 116))
BLOB = CiphertextBlob(KEY_ID, 3, SEALED)
MIN_SIZE = codec.HEADER_SIZE + codec.MIN_SEALED

blobs = st.builds(
    CiphertextBlob,
    key_id=st.uuids(),
    version=st.integers(1, 0xFFFFFFFF),
    sealed=st.binary(min_size=codec.MIN_SEALED, max_size=2048),
)


def _decode_or_invalid(data: bytes) -> CiphertextBlob | None:
    try:
        return codec.decode(data)
    except InvalidCiphertext as exc:
        assert exc.code == "invalid_ciphertext"
        assert exc.status == 400
        return None


# --- layout and round trip -------------------------------------------------------------------


def test_known_layout() -> None:
    data = codec.encode(BLOB)
    assert codec.HEADER_SIZE == 23
    assert data[:2] == b"KC"
    assert data[2] == 1
    assert data[3:19] == KEY_ID.bytes
    assert data[19:23] == b"\x00\x00\x00\x03"
    assert data[23:] == SEALED
    assert codec.decode(data) == BLOB


@BOUNDED
@given(blobs)
def test_round_trip(blob: CiphertextBlob) -> None:
    data = codec.encode(blob)
    assert len(data) == codec.HEADER_SIZE + len(blob.sealed)
    decoded = codec.decode(data)
    assert decoded == blob
    assert isinstance(decoded.sealed, bytes)
    assert codec.encode(decoded) == data


def test_largest_blob_round_trips() -> None:
    blob = CiphertextBlob(KEY_ID, 0xFFFFFFFF, b"\xab" * (codec.MAX_BLOB - codec.HEADER_SIZE))
    assert codec.decode(codec.encode(blob)) == blob


def test_minimum_blob_round_trips() -> None:
    blob = CiphertextBlob(KEY_ID, 1, b"\x00" * codec.MIN_SEALED)
    assert codec.decode(codec.encode(blob)) == blob


@pytest.mark.parametrize("version", [0, -1, 1 << 32])
def test_encode_rejects_bad_version(version: int) -> None:
    with pytest.raises(ValueError):
        codec.encode(CiphertextBlob(KEY_ID, version, SEALED))


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"KD", b"kc", b"CK", b"\x00\x00", b"\xff\xff"])
def test_wrong_magic(magic: bytes) -> None:
    data = magic + codec.encode(BLOB)[2:]
    with pytest.raises(InvalidCiphertext, match="magic"):
        codec.decode(data)


@pytest.mark.parametrize("fmt", [0, 2, 0x7F, 0xFF])
def test_wrong_format_byte(fmt: int) -> None:
    data = bytearray(codec.encode(BLOB))
    data[2] = fmt
    with pytest.raises(InvalidCiphertext, match="format"):
        codec.decode(bytes(data))


def test_version_zero() -> None:
    data = struct.pack(">2sB16sI", b"KC", 1, KEY_ID.bytes, 0) + SEALED
    with pytest.raises(InvalidCiphertext, match="version 0"):
        codec.decode(data)


def test_truncated_at_every_length_below_the_minimum() -> None:
    data = codec.encode(CiphertextBlob(KEY_ID, 1, b"\x01" * codec.MIN_SEALED))
    assert len(data) == MIN_SIZE
    for length in range(MIN_SIZE):
        with pytest.raises(InvalidCiphertext, match="truncated"):
            codec.decode(data[:length])


def test_oversized() -> None:
    data = codec.encode(CiphertextBlob(KEY_ID, 1, b"\x00" * (codec.MAX_BLOB - codec.HEADER_SIZE + 1)))
    with pytest.raises(InvalidCiphertext, match="larger"):
        codec.decode(data)
    with pytest.raises(InvalidCiphertext):
        codec.decode(b"\x00" * (16 * 1024 * 1024))


def test_invalid_ciphertext_is_a_bad_request() -> None:
    with pytest.raises(BadRequest) as info:
        codec.decode(b"")
    assert info.value.code == "invalid_ciphertext"


# --- fuzz ------------------------------------------------------------------------------------


@BOUNDED
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data: bytes) -> None:
    result = _decode_or_invalid(data)
    if result is not None:
        assert codec.encode(result) == data


@BOUNDED
@given(st.integers(0, 255), st.binary(min_size=16, max_size=16), st.binary(min_size=4, max_size=4), st.binary())
def test_fuzz_random_bytes_behind_the_magic(fmt: int, key_id: bytes, version: bytes, tail: bytes) -> None:
    data = b"KC" + bytes([fmt]) + key_id + version + tail
    result = _decode_or_invalid(data)
    if fmt != 1 or version == b"\x00" * 4 or len(tail) < codec.MIN_SEALED:
        assert result is None
    else:
        assert result is not None
        assert result.key_id.bytes == key_id
        assert result.version == int.from_bytes(version, "big")
        assert result.sealed == tail


@BOUNDED
@given(blobs, st.data())
def test_fuzz_mutations_of_a_valid_blob(blob: CiphertextBlob, data: st.DataObject) -> None:
    raw = bytearray(codec.encode(blob))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if op == "flip" and raw:
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[data.draw(st.integers(0, len(raw))) :]
        else:
            raw += data.draw(st.binary(max_size=64))
    result = _decode_or_invalid(bytes(raw))
    if result is not None:
        assert codec.encode(result) == bytes(raw)
