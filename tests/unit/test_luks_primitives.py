"""LUKS building blocks: AF splitter (checked against an independent implementation), KDFs, area cipher."""

from __future__ import annotations

import hashlib
import random

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.formats import luks
from keysteward.formats.luks.errors import ARGON2_MEMORY, UNSUPPORTED, LuksFormatError
from keysteward.formats.luks.hashes import pbkdf2

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=50, deadline=None)


def _reference_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """The AF merge written straight from the LUKS1 spec (byte loops, no shared code)."""
    digest = hashlib.new(hash_name).digest_size

    def diffuse(block: bytes) -> bytes:
        out = b""
        for i in range(0, key_size, digest):
            chunk = block[i : i + digest]
            out += hashlib.new(hash_name, (i // digest).to_bytes(4, "big") + chunk).digest()[: len(chunk)]
        return out

    acc = bytes(key_size)
    for s in range(stripes - 1):
        acc = diffuse(bytes(a ^ b for a, b in zip(acc, material[s * key_size : (s + 1) * key_size], strict=True)))
    last = material[(stripes - 1) * key_size : stripes * key_size]
    return bytes(a ^ b for a, b in zip(acc, last, strict=True))


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_size", [16, 20, 32, 33, 64])
def test_af_split_merge_matches_reference(hash_name: str, key_size: int) -> None:
    rng = random.Random(key_size).randbytes
    key = rng(key_size)
    material = luks.af_split(key, hash_name, 4000, rng=rng)
    assert len(material) == key_size * 4000
    assert luks.af_merge(material, key_size, hash_name) == key
    assert _reference_merge(bytes(material), key_size, 40, hash_name) == luks.af_merge(
        material, key_size, hash_name, 40
    )
    assert luks.af_sectors(key_size) == -(-key_size * 4000 // 512)


@BOUNDED
@given(key=st.binary(min_size=1, max_size=96), stripes=st.integers(1, 12), seed=st.integers(0, 2**32))
def test_af_roundtrip_any_key(key: bytes, stripes: int, seed: int) -> None:
    material = luks.af_split(key, "sha256", stripes, rng=random.Random(seed).randbytes)
    assert luks.af_merge(material, len(key), "sha256", stripes) == key
    assert _reference_merge(bytes(material), len(key), stripes, "sha256") == key


def test_af_one_lost_stripe_loses_the_key() -> None:
    key = bytes(range(32))
    material = luks.af_split(key, "sha256", rng=random.Random(1).randbytes)
    material[5 * 32] ^= 1
    assert luks.af_merge(material, 32, "sha256") != key


@pytest.mark.parametrize(("key_size", "stripes"), [(0, 4000), (513, 4000), (32, 0), (32, 4001)])
def test_af_refuses_bad_sizes(key_size: int, stripes: int) -> None:
    with pytest.raises(LuksFormatError):
        luks.af_sectors(key_size, stripes)


def test_af_refuses_short_material_and_unknown_hash() -> None:
    with pytest.raises(LuksFormatError):
        luks.af_merge(bytes(100), 32, "sha256")
    with pytest.raises(LuksFormatError) as info:
        luks.af_merge(bytes(32 * 4000), 32, "whirlpool")
    assert info.value.code == UNSUPPORTED


def test_pbkdf2_rfc7914_vector() -> None:
    expected = bytes.fromhex(
        "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
    )
    assert pbkdf2("sha256", b"passwd", b"salt", 1, 64) == expected


def test_derive_key_pbkdf2_and_argon2() -> None:
    salt = bytes(range(32))
    p = luks.Pbkdf2Params("sha512", 1000, salt)
    assert luks.derive_key(p, b"pw", 64) == hashlib.pbkdf2_hmac("sha512", b"pw", salt, 1000, 64)
    for kind in ("argon2i", "argon2id"):
        params = luks.Argon2Params(kind, 1, 64, 1, salt)
        key = luks.derive_key(params, b"pw", 32)
        assert len(key) == 32 and key == luks.derive_key(params, b"pw", 32)
    assert luks.derive_key(luks.Argon2Params("argon2i", 1, 64, 1, salt), b"pw", 32) != luks.derive_key(
        luks.Argon2Params("argon2id", 1, 64, 1, salt), b"pw", 32
    )


def test_argon2_memory_cap_names_the_requirement() -> None:
    params = luks.Argon2Params("argon2id", 4, 1048576, 4, bytes(32))
    with pytest.raises(LuksFormatError) as info:
        luks.derive_key(params, b"pw", 32, max_memory_kib=65536)
    assert info.value.code == ARGON2_MEMORY
    assert "1048576 KiB" in info.value.message and "65536 KiB" in info.value.message


@pytest.mark.parametrize(
    "params",
    [
        luks.Pbkdf2Params("sha256", 0, bytes(32)),
        luks.Pbkdf2Params("sha256", 1000, bytes(16)),
        luks.Argon2Params("argon2id", 0, 64, 1, bytes(32)),
        luks.Argon2Params("argon2id", 1, 7, 1, bytes(32)),
        luks.Argon2Params("argon2id", 1, 64, 0, bytes(32)),
        luks.Argon2Params("argon2d", 1, 64, 1, bytes(32)),  # type: ignore[arg-type]
        luks.Pbkdf2Params("md4", 1000, bytes(32)),
    ],
)
def test_derive_key_refuses_bad_parameters(params: luks.KdfParams) -> None:
    with pytest.raises(LuksFormatError):
        luks.derive_key(params, b"pw", 32)


def test_new_kdf_params_make_fresh_salts() -> None:
    a, b = luks.new_pbkdf2(), luks.new_pbkdf2()
    assert a.salt != b.salt and len(a.salt) == 32 and a.type == "pbkdf2"
    assert luks.new_argon2("argon2i").type == "argon2i"


@pytest.mark.parametrize("key_size", [32, 64])
def test_area_cipher_restarts_iv_at_zero_per_area(key_size: int) -> None:
    key = bytes(range(1, key_size + 1))
    data = random.Random(2).randbytes(3 * 512)
    encrypted = luks.xts_area_cipher("aes-xts-plain64", key, data, False)
    for sector in range(3):
        ctx = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little"))).encryptor()
        assert encrypted[sector * 512 : (sector + 1) * 512] == ctx.update(data[sector * 512 : (sector + 1) * 512])
    assert luks.xts_area_cipher("aes-xts-plain64", key, encrypted, True) == data


@pytest.mark.parametrize(
    ("spec", "key_size", "length"),
    [("aes-cbc-essiv:sha256", 32, 512), ("serpent-xts-plain64", 64, 512), ("aes-xts-plain64", 48, 512)],
)
def test_area_cipher_refuses_what_it_cannot_do(spec: str, key_size: int, length: int) -> None:
    with pytest.raises(LuksFormatError) as info:
        luks.xts_area_cipher(spec, bytes(range(key_size)), bytes(length), True)
    assert info.value.code == UNSUPPORTED


def test_area_cipher_refuses_partial_sectors() -> None:
    with pytest.raises(LuksFormatError):
        luks.xts_area_cipher("aes-xts-plain64", bytes(range(64)), bytes(100), True)
