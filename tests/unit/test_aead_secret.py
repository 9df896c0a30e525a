"""AES-256-GCM envelopes (keysteward.crypto.aead) and locked secret buffers (keysteward.crypto.secret)."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.crypto import aead
from keysteward.crypto.aead import AeadKey, AuthenticationFailed
from keysteward.crypto.secret import SecretBuffer, wipe_bytearray
from keysteward.errors import KeystewardError, Unavailable

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=100, deadline=None)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
AAD = b"keysteward/v1/dek|tenant-a|key-1|1|dek-1"
PLAINTEXT = b"the volume's data encryption key"


# --- AEAD ------------------------------------------------------------------------------------


def test_round_trip() -> None:
    key = AeadKey(KEY)
    blob = key.seal(PLAINTEXT, AAD)
    assert len(blob) == len(PLAINTEXT) + aead.OVERHEAD
    opened = key.open(blob, AAD)
    assert opened == PLAINTEXT
    assert isinstance(opened, bytearray)
    assert PLAINTEXT not in blob


@BOUNDED
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=2048), st.binary(max_size=256))
def test_round_trip_any_input(key: bytes, plaintext: bytes, aad: bytes) -> None:
    blob = aead.seal(key, plaintext, aad)
    assert aead.open_(key, blob, aad) == plaintext
    assert aead.open_(bytearray(key), memoryview(blob), aad) == plaintext


def test_accepts_buffer_types_for_key_and_plaintext() -> None:
    for key in (bytearray(KEY), memoryview(KEY)):
        for plaintext in (bytearray(PLAINTEXT), memoryview(PLAINTEXT)):
            blob = aead.seal(key, plaintext, AAD)
            assert aead.open_(KEY, bytearray(blob), AAD) == PLAINTEXT


def test_two_seals_of_the_same_plaintext_differ() -> None:
    key = AeadKey(KEY)
    blobs = {key.seal(PLAINTEXT, AAD) for _ in range(64)}
    assert len(blobs) == 64
    nonces = {b[: aead.NONCE_SIZE] for b in blobs}
    assert len(nonces) == 64


def test_seal_output_opens_with_aesgcm_directly() -> None:
    blob = AeadKey(KEY).seal(PLAINTEXT, AAD)
    nonce, ciphertext_and_tag = blob[: aead.NONCE_SIZE], blob[aead.NONCE_SIZE :]
    assert AESGCM(KEY).decrypt(nonce, ciphertext_and_tag, AAD) == PLAINTEXT


def test_aesgcm_output_opens_with_aead_key() -> None:
    nonce = os.urandom(12)
    blob = nonce + AESGCM(KEY).encrypt(nonce, PLAINTEXT, AAD)
    assert AeadKey(KEY).open(blob, AAD) == PLAINTEXT


@pytest.mark.parametrize(
    ("plaintext", "expected"),
    [
        # McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13 and 14 (AES-256, zero key and IV)
        (b"", "530f8afbc74536b9a963b4f1c4cb738b"),
        (b"\x00" * 16, "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"),
    ],
)
def test_published_vectors_open(plaintext: bytes, expected: str) -> None:
    blob = b"\x00" * 12 + bytes.fromhex(expected)
    assert aead.open_(b"\x00" * 32, blob, b"") == plaintext


def test_wrong_aad_fails() -> None:
    key = AeadKey(KEY)
    blob = key.seal(PLAINTEXT, AAD)
    for aad in (b"", AAD + b"x", AAD[:-1], AAD.replace(b"tenant-a", b"tenant-b"), AAD.upper()):
        with pytest.raises(AuthenticationFailed):
            key.open(blob, aad)


def test_flipped_bit_anywhere_fails() -> None:
    key = AeadKey(KEY)
    blob = key.seal(PLAINTEXT, AAD)
    for pos in range(len(blob)):  # nonce, ciphertext and tag
        for bit in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[pos] ^= bit
            with pytest.raises(AuthenticationFailed):
                key.open(bytes(tampered), AAD)


def test_truncated_at_every_length_fails() -> None:
    key = AeadKey(KEY)
    blob = key.seal(PLAINTEXT, AAD)
    for length in range(len(blob)):
        with pytest.raises(AuthenticationFailed):
            key.open(blob[:length], AAD)


def test_extended_blob_fails() -> None:
    key = AeadKey(KEY)
    blob = key.seal(PLAINTEXT, AAD)
    with pytest.raises(AuthenticationFailed):
        key.open(blob + b"\x00", AAD)


def test_wrong_key_fails() -> None:
    blob = aead.seal(KEY, PLAINTEXT, AAD)
    with pytest.raises(AuthenticationFailed):
        aead.open_(OTHER_KEY, blob, AAD)


@BOUNDED
@given(st.binary(max_size=200))
def test_fuzz_open_only_raises_authentication_failed(blob: bytes) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        AeadKey(KEY).open(blob, AAD)
    assert isinstance(info.value, KeystewardError)
    assert info.value.code == "authentication_failed"
    assert info.value.status == 400


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_key_size_must_be_32(size: int) -> None:
    with pytest.raises(ValueError):
        AeadKey(b"\x00" * size)


def test_dropped_key_cannot_be_used() -> None:
    key = AeadKey(KEY)
    blob = key.seal(PLAINTEXT, AAD)
    key.drop()
    with pytest.raises(Unavailable):
        key.seal(PLAINTEXT, AAD)
    with pytest.raises(Unavailable):
        key.open(blob, AAD)


def test_aead_key_repr_hides_key() -> None:
    key = AeadKey(KEY)
    assert repr(key) == "<AeadKey>"
    assert KEY.hex() not in repr(key)


def test_random_key() -> None:
    keys = [aead.random_key() for _ in range(8)]
    assert all(isinstance(k, bytearray) and len(k) == 32 for k in keys)
    assert len({bytes(k) for k in keys}) == 8
    assert len(aead.random_key(16)) == 16


def test_error_messages_carry_no_key_material() -> None:
    blob = bytearray(aead.seal(KEY, PLAINTEXT, AAD))
    blob[-1] ^= 1
    with pytest.raises(AuthenticationFailed) as info:
        aead.open_(KEY, bytes(blob), AAD)
    text = str(info.value) + info.value.diagnostics()
    for needle in (KEY.hex(), PLAINTEXT.decode(), PLAINTEXT.hex()):
        assert needle not in text


# --- SecretBuffer ----------------------------------------------------------------------------


class _SpyMap:
    """Stands in for the buffer's mmap to read the mapped bytes at the moment it is unmapped."""

    def __init__(self, real: mmap.mmap, address: int, size: int) -> None:
        self.real = real
        self.address = address
        self.size = size
        self.seen: bytes | None = None

    def __len__(self) -> int:
        return len(self.real)

    def close(self) -> None:
        self.seen = ctypes.string_at(self.address, self.size)
        self.real.close()


def test_from_bytes_copies_and_wipes_a_bytearray_source() -> None:
    source = bytearray(b"\x5a" * 32)
    buf = SecretBuffer.from_bytes(source)
    assert source == bytearray(32)
    assert buf.bytes() == b"\x5a" * 32
    assert len(buf) == 32
    buf.wipe()


def test_from_bytes_leaves_immutable_sources_alone() -> None:
    data = b"\x11" * 16
    with SecretBuffer.from_bytes(data) as buf:
        assert bytes(buf.view()) == data
    with SecretBuffer.from_bytes(memoryview(data)) as buf:
        assert buf.bytes() == data


def test_view_is_writable_and_sized() -> None:
    with SecretBuffer(48) as buf:
        view = buf.view()
        assert len(view) == 48
        assert bytes(view) == bytes(48)
        view[:] = b"\x07" * 48
        assert buf.bytes() == b"\x07" * 48


def test_wipe_zeroes_a_one_page_buffer_before_its_page_is_used_again() -> None:
    material = os.urandom(64)
    buf = SecretBuffer.from_bytes(material)
    address = ctypes.addressof(buf._c)
    assert ctypes.string_at(address, 64) == material  # the secret really lives at this address
    buf.wipe()
    assert ctypes.string_at(address, mmap.PAGESIZE) == bytes(mmap.PAGESIZE)  # pooled: still mapped, all zero
    again = SecretBuffer(64)  # the pooled page serves the next buffer, still locked
    assert ctypes.addressof(again._c) == address and again.locked and again.bytes() == bytes(64)
    again.wipe()


def test_a_page_someone_still_views_is_zeroed_and_never_reused() -> None:
    buf = SecretBuffer.from_bytes(b"\x37" * 48)
    address = ctypes.addressof(buf._c)
    held = buf.view()[:16]  # a caller's slice outlives the wipe
    buf.wipe()
    assert bytes(held) == bytes(16)
    others = [SecretBuffer(16) for _ in range(70)]  # more than the pool holds
    assert all(ctypes.addressof(o._c) != address for o in others)
    for other in others:
        other.wipe()
    held.release()


def test_wipe_zeroes_a_multi_page_buffer() -> None:
    size = 3 * mmap.PAGESIZE + 5
    material = os.urandom(size)
    buf = SecretBuffer.from_bytes(bytearray(material))
    address = ctypes.addressof(buf._c)
    spy = _SpyMap(buf._map, address, size)  # type: ignore[arg-type]
    buf._map = spy  # type: ignore[assignment]
    buf.wipe()
    assert spy.seen == bytes(size)


def test_after_wipe_nothing_is_readable() -> None:
    buf = SecretBuffer.from_bytes(b"\x42" * 32)
    view = buf.view()
    buf.wipe()
    assert buf.closed
    with pytest.raises(ValueError):
        buf.view()
    with pytest.raises(ValueError):
        buf.bytes()
    with pytest.raises(ValueError):  # the view handed out earlier is released too
        bytes(view)
    buf.wipe()  # idempotent
    assert repr(buf) == "<SecretBuffer wiped>"


def test_context_manager_wipes_even_on_error() -> None:
    with pytest.raises(RuntimeError), SecretBuffer.from_bytes(b"\x01" * 8) as buf:
        raise RuntimeError("boom")
    assert buf.closed


def test_wipe_with_a_live_derived_view_still_closes() -> None:
    buf = SecretBuffer.from_bytes(b"\x42" * 32)
    first_half = buf.view()[:16]
    buf.wipe()  # a live slice must not stop the wipe
    assert buf.closed
    assert bytes(first_half) == bytes(16)  # the bytes the slice sees are zeroed
    del first_half


def test_repr_never_shows_content() -> None:
    material = b"\xde\xad\xbe\xef" * 8
    buf = SecretBuffer.from_bytes(material)
    text = repr(buf) + str(buf)
    assert text.startswith("<SecretBuffer 32 bytes>")
    for needle in (material.hex(), "deadbeef", "\\xde", str(list(material[:4]))):
        assert needle not in text
    buf.wipe()


def test_locked_when_running_as_root() -> None:
    with SecretBuffer(32) as buf:
        if os.geteuid() == 0:
            assert buf.locked is True
        else:
            assert isinstance(buf.locked, bool)


@pytest.mark.parametrize("size", [0, -1, (1 << 20) + 1])
def test_size_out_of_range(size: int) -> None:
    with pytest.raises(ValueError):
        SecretBuffer(size)


def test_largest_size_is_allowed() -> None:
    with SecretBuffer(1 << 20) as buf:
        assert len(buf) == 1 << 20


def test_wipe_bytearray() -> None:
    data = bytearray(os.urandom(100))
    wipe_bytearray(data)
    assert data == bytearray(100)
    empty = bytearray()
    wipe_bytearray(empty)
    assert empty == bytearray()


def test_secret_buffer_as_aead_key() -> None:
    with SecretBuffer.from_bytes(bytearray(KEY)) as buf:
        key = AeadKey(buf.view())
        assert key.open(aead.seal(KEY, PLAINTEXT, AAD), AAD) == PLAINTEXT


def test_disable_core_dumps() -> None:
    # in a child process: the hard limit cannot be raised again without CAP_SYS_RESOURCE
    code = (
        "import resource; from keysteward.crypto import secret; secret.disable_core_dumps(); "
        "print(resource.getrlimit(resource.RLIMIT_CORE))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "(0, 0)"
