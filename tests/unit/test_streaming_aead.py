"""Tink's AES-GCM-HKDF streaming AEAD on pyca (keysteward.crypto.streaming_aead): round trips around
segment boundaries, short reads, and every damaged stream refused with ``stream_auth_failed``."""

from __future__ import annotations

import io
import itertools
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.crypto import streaming_aead as sa
from keysteward.crypto.streaming_aead import HEADER_SIZE, TAG_SIZE, StreamAuthFailed

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=200, deadline=None)
KEY = bytes(range(32))
AAD = b"tenant=t1 vm=vm1 snapshot=s1"
SEG = 128  # small segments: many boundaries in few bytes
FIRST = SEG - HEADER_SIZE - TAG_SIZE  # plaintext bytes in the first segment
PLAIN = SEG - TAG_SIZE  # plaintext bytes in every later one


class Trickle(io.RawIOBase):
    """A pipe-like source: at most ``step`` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._src, self._step = io.BytesIO(data), step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        chunk = self._src.read(min(len(b), self._step))
        b[: len(chunk)] = chunk
        return len(chunk)


def encrypt(data: bytes, *, key: bytes = KEY, aad: bytes = AAD, seg: int = SEG) -> bytes:
    out = io.BytesIO()
    assert sa.encrypt_stream(key, aad, io.BytesIO(data), out, segment_size=seg) == len(data)
    return out.getvalue()


def decrypt(blob: bytes, *, key: bytes = KEY, aad: bytes = AAD, seg: int = SEG) -> bytes:
    out = io.BytesIO()
    n = sa.decrypt_stream(key, aad, io.BytesIO(blob), out, segment_size=seg)
    assert n == len(out.getvalue())
    return out.getvalue()


def segments(blob: bytes, seg: int = SEG) -> list[bytes]:
    """The ciphertext segments (the first one without the header)."""
    body = blob[HEADER_SIZE:]
    cuts = [0, seg - HEADER_SIZE]
    while cuts[-1] < len(body):
        cuts.append(cuts[-1] + seg)
    return [body[a:b] for a, b in itertools.pairwise(cuts) if body[a:b]]


BOUNDARY_SIZES = sorted(
    {0, 1, FIRST - 1, FIRST, FIRST + 1, FIRST + PLAIN - 1, FIRST + PLAIN, FIRST + PLAIN + 1, FIRST + 3 * PLAIN}
)


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_round_trip_at_segment_boundaries(size: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data)
    expected_segments = 1 if size <= FIRST else 1 + -(-(size - FIRST) // PLAIN)
    assert len(blob) == HEADER_SIZE + size + TAG_SIZE * expected_segments
    assert blob[0] == HEADER_SIZE
    assert decrypt(blob) == data
    assert sa.verify_stream(KEY, AAD, io.BytesIO(blob), segment_size=SEG) == size


@BOUNDED
@given(
    size=st.one_of(st.integers(0, 6 * SEG), st.sampled_from(BOUNDARY_SIZES)),
    step=st.integers(1, 3 * SEG),
    chunk=st.integers(1, 3 * SEG),
)
def test_round_trip_with_short_reads_and_incremental_encryptor(size: int, step: int, chunk: int) -> None:
    data = os.urandom(size)
    out = io.BytesIO()
    assert sa.encrypt_stream(KEY, AAD, Trickle(data, step), out, segment_size=SEG) == size
    blob = out.getvalue()
    back = io.BytesIO()
    assert sa.decrypt_stream(KEY, AAD, Trickle(blob, step), back, segment_size=SEG) == size
    assert back.getvalue() == data
    enc = sa.StreamEncryptor(KEY, AAD, segment_size=SEG)
    parts = [enc.update(data[i : i + chunk]) for i in range(0, size, chunk)] + [enc.finalize()]
    incremental = b"".join(parts)
    assert len(incremental) == len(blob)  # same framing; salt and nonce prefix are fresh per stream
    assert decrypt(incremental) == data


def test_fresh_salt_and_nonce_prefix_per_stream() -> None:
    a, b = encrypt(b"same"), encrypt(b"same")
    assert a[:HEADER_SIZE] != b[:HEADER_SIZE] and a[HEADER_SIZE:] != b[HEADER_SIZE:]


PREFIX = b"a header before the stream"


def verify_file(blob: bytes, workers: int, *, key: bytes = KEY, aad: bytes = AAD) -> int:
    """:func:`sa.verify_file` over ``blob`` stored after :data:`PREFIX` in a real file."""
    with tempfile.TemporaryFile() as f:
        f.write(PREFIX + blob)
        f.flush()
        return sa.verify_file(key, aad, f.fileno(), len(PREFIX), len(PREFIX) + len(blob), segment_size=SEG,
                              workers=workers)  # fmt: skip


def refused(blob: bytes, **kw: bytes) -> StreamAuthFailed:
    sink = io.BytesIO()
    with pytest.raises(StreamAuthFailed) as info:
        sa.decrypt_stream(kw.get("key", KEY), kw.get("aad", AAD), io.BytesIO(blob), sink, segment_size=SEG)
    with pytest.raises(StreamAuthFailed):
        sa.verify_stream(kw.get("key", KEY), kw.get("aad", AAD), io.BytesIO(blob), segment_size=SEG)
    for workers in (1, 2, 3):  # the threaded whole-file check refuses the same, naming the same first segment
        with pytest.raises(StreamAuthFailed) as threaded:
            verify_file(blob, workers, **kw)
        assert threaded.value.message == info.value.message, workers
    assert info.value.code == "stream_auth_failed"
    return info.value


DATA = bytes(range(256)) * 3  # 768 bytes: a first segment and several full ones
BLOB = encrypt(DATA)
SEGS = segments(BLOB)


def test_wrong_key_and_wrong_associated_data() -> None:
    refused(BLOB, key=bytes(32))
    refused(BLOB, aad=AAD + b"x")
    refused(BLOB, aad=b"")


@BOUNDED
@given(position=st.integers(0, len(BLOB) - 1), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused(position: int, bit: int) -> None:
    damaged = bytearray(BLOB)
    damaged[position] ^= 1 << bit
    refused(bytes(damaged))


def test_reordered_segments_are_refused() -> None:
    assert len(SEGS) >= 4
    swapped = [*SEGS[:1], SEGS[2], SEGS[1], *SEGS[3:]]
    refused(BLOB[:HEADER_SIZE] + b"".join(swapped))


def test_segment_from_another_stream_is_refused() -> None:
    other = segments(encrypt(DATA))
    refused(BLOB[:HEADER_SIZE] + b"".join([SEGS[0], other[1], *SEGS[2:]]))


@pytest.mark.parametrize("keep", [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 10, len(BLOB) - 1])
def test_truncated_streams_are_refused(keep: int) -> None:
    refused(BLOB[:keep])


def test_cut_exactly_at_a_segment_boundary_is_refused() -> None:
    for count in range(1, len(SEGS)):
        message = refused(BLOB[:HEADER_SIZE] + b"".join(SEGS[:count])).message
        assert f"segment {count - 1}" in message


def test_dropped_middle_segment_is_refused() -> None:
    refused(BLOB[:HEADER_SIZE] + b"".join(SEGS[:1] + SEGS[2:]))


@pytest.mark.parametrize("tail", [b"\x00", os.urandom(TAG_SIZE), os.urandom(SEG)])
def test_extended_streams_are_refused(tail: bytes) -> None:
    refused(BLOB + tail)


def test_whole_extra_segment_of_the_same_stream_is_refused() -> None:
    refused(BLOB + SEGS[-1])


def test_header_with_wrong_length_byte_is_refused() -> None:
    refused(bytes([HEADER_SIZE + 1]) + BLOB[1:])


def test_decrypt_writes_only_authenticated_segments() -> None:
    damaged = bytearray(BLOB)
    damaged[HEADER_SIZE + SEG - HEADER_SIZE + 5] ^= 1  # inside segment 1
    sink = io.BytesIO()
    with pytest.raises(StreamAuthFailed):
        sa.decrypt_stream(KEY, AAD, io.BytesIO(bytes(damaged)), sink, segment_size=SEG)
    assert sink.getvalue() == DATA[:FIRST]  # segment 0 only; nothing of the damaged one


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="32-byte"):
        encrypt(b"x", key=bytes(16))
    with pytest.raises(ValueError, match="segment_size"):
        encrypt(b"x", seg=HEADER_SIZE + TAG_SIZE)
    enc = sa.StreamEncryptor(KEY, AAD, segment_size=SEG)
    enc.finalize()
    with pytest.raises(ValueError, match="finalized"):
        enc.update(b"x")


def test_error_text_holds_no_key_material() -> None:
    err = refused(BLOB, key=bytes(range(1, 33)))
    assert KEY.hex() not in str(err) and bytes(range(1, 33)).hex() not in str(err)


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threaded_file_check_accepts_every_boundary_size(size: int, workers: int) -> None:
    assert verify_file(encrypt(os.urandom(size)), workers) == size


def test_threaded_file_check_reports_the_first_of_several_bad_segments() -> None:
    damaged = bytearray(BLOB)
    for number in (4, 1, 3):  # segments 1, 3 and 4 damaged: checked by different threads
        damaged[HEADER_SIZE + (SEG - HEADER_SIZE) + (number - 1) * SEG + 5] ^= 1
    for workers in (1, 2, 3):
        with pytest.raises(StreamAuthFailed, match="segment 1 "):
            verify_file(bytes(damaged), workers)
