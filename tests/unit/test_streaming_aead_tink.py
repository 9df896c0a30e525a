"""Interop with Google's Tink (PyPI ``tink``): the same raw 32-byte key as a Tink AES-GCM-HKDF streaming
keyset (RAW prefix: Tink's streaming primitive prefixes nothing); Tink's ciphertext opens here and ours
opens in Tink, byte sizes equal, for sizes around the 1 MiB segment boundaries."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
from tink import cleartext_keyset_handle, streaming_aead  # the [test] extras: a missing tink fails, never skips
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

from keysteward.crypto import streaming_aead as sa
from keysteward.crypto.streaming_aead import HEADER_SIZE, SEGMENT_SIZE, TAG_SIZE, StreamAuthFailed

pytestmark = pytest.mark.unit

AAD = b"keysteward interop"
FIRST = SEGMENT_SIZE - HEADER_SIZE - TAG_SIZE
PLAIN = SEGMENT_SIZE - TAG_SIZE
SIZES = [0, 1, 4096, FIRST - 1, FIRST, FIRST + 1, FIRST + PLAIN, FIRST + PLAIN + 1, 3 * SEGMENT_SIZE + 17]


class _KeepOpen(io.BytesIO):
    """Tink closes its destination on close(); keep the bytes readable."""

    def close(self) -> None:
        pass


def tink_primitive(key: bytes, segment_size: int = SEGMENT_SIZE) -> Any:
    streaming_aead.register()
    params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=segment_size, derived_key_size=32, hkdf_hash_type=common_pb2.SHA256
    )
    key_proto = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(version=0, params=params, key_value=key)
    keyset = tink_pb2.Keyset(
        primary_key_id=42,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=key_proto.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=42,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    return cleartext_keyset_handle.from_keyset(keyset).primitive(streaming_aead.StreamingAead)


def tink_encrypt(primitive: Any, data: bytes, aad: bytes = AAD) -> bytes:
    dst = _KeepOpen()
    with primitive.new_encrypting_stream(dst, aad) as stream:
        stream.write(data)
    return dst.getvalue()


def tink_decrypt(primitive: Any, blob: bytes, aad: bytes = AAD) -> bytes:
    with primitive.new_decrypting_stream(io.BytesIO(blob), aad) as stream:
        return bytes(stream.read())


@pytest.fixture(scope="module")
def key() -> bytes:
    return os.urandom(32)


@pytest.mark.parametrize("size", SIZES)
def test_tink_encrypts_we_decrypt(key: bytes, size: int) -> None:
    data = os.urandom(size)
    blob = tink_encrypt(tink_primitive(key), data)
    assert blob[0] == HEADER_SIZE  # nothing before the header: no key-id prefix
    out = io.BytesIO()
    assert sa.decrypt_stream(key, AAD, io.BytesIO(blob), out) == size
    assert out.getvalue() == data


@pytest.mark.parametrize("size", SIZES)
def test_we_encrypt_tink_decrypts(key: bytes, size: int) -> None:
    data = os.urandom(size)
    ours = io.BytesIO()
    sa.encrypt_stream(key, AAD, io.BytesIO(data), ours)
    assert len(ours.getvalue()) == len(tink_encrypt(tink_primitive(key), data))  # same framing
    assert tink_decrypt(tink_primitive(key), ours.getvalue()) == data


def test_incremental_encryptor_output_opens_in_tink(key: bytes) -> None:
    data = os.urandom(FIRST + PLAIN + 999)
    enc = sa.StreamEncryptor(key, AAD)
    blob = b"".join([enc.update(data[i : i + 65_536]) for i in range(0, len(data), 65_536)]) + enc.finalize()
    assert tink_decrypt(tink_primitive(key), blob) == data


def test_small_segments_interop(key: bytes) -> None:
    data = os.urandom(10_000)
    blob = tink_encrypt(tink_primitive(key, 4096), data)
    out = io.BytesIO()
    sa.decrypt_stream(key, AAD, io.BytesIO(blob), out, segment_size=4096)
    assert out.getvalue() == data


def test_tink_stream_with_wrong_aad_or_truncated_is_refused(key: bytes) -> None:
    blob = tink_encrypt(tink_primitive(key), os.urandom(FIRST + 10))
    with pytest.raises(StreamAuthFailed):
        sa.verify_stream(key, AAD + b"!", io.BytesIO(blob))
    with pytest.raises(StreamAuthFailed):
        sa.verify_stream(key, AAD, io.BytesIO(blob[:SEGMENT_SIZE]))  # cut at the first segment's end
