"""AES-XTS data path (keysteward.crypto.xts): known answers, native == reference, tweak rules, threads.

The native path is a cffi extension built by ``pip install``; on this project's machines it must be
there (the first test fails otherwise), and every other test runs against it and against the
pyca/cryptography reference path, which is itself checked against IEEE 1619 vectors and pyca.
"""

from __future__ import annotations

import array
import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.crypto import xts
from keysteward.crypto.xts import XtsCipher, native_available
from keysteward.crypto.xts_reference import decrypt_sectors_reference, encrypt_sectors_reference

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=100, deadline=None)
U64 = 1 << 64

KEY128 = bytes(range(1, 33))
KEY256 = bytes(range(100, 164))
HALVES_DIFFER = "XTS key halves must differ"

# IEEE Std 1619-2007 Annex B (XTS-AES). Key = Key1 || Key2; the data unit sequence number is the
# tweak's little-endian integer, which for these small numbers is exactly dm-crypt's plain64.
PATTERN_512 = bytes(range(256)) * 2
IEEE_VECTORS = {
    # vector: (key, data unit sequence number, plaintext, ciphertext)
    "v2-aes128-32B": (
        bytes([0x11] * 16 + [0x22] * 16),
        0x3333333333,
        bytes([0x44] * 32),
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    ),
    "v3-aes128-32B": (
        bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0" + "22" * 16),
        0x3333333333,
        bytes([0x44] * 32),
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    ),
    "v4-aes128-512B": (
        bytes.fromhex("2718281828459045235360287471352631415926535897932384626433832795"),
        0,
        PATTERN_512,
        "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f560000"
        "05279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
        "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4c4e41a8952c651d33174be51"
        "a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
        "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec3"
        "0bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
        "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6"
        "d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
        "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38"
        "fc82bbe872c5539edb609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
        "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568",
    ),
    "v10-aes256-512B": (
        bytes.fromhex(
            "2718281828459045235360287471352662497757247093699959574966967627"
            "3141592653589793238462643383279502884197169399375105820974944592"
        ),
        0xFF,
        PATTERN_512,
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44"
        "680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
        "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7d"
        "e8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
        "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6"
        "dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
        "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b"
        "11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
        "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493"
        "c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
        "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
    ),
}
# Vector 1: Key1 == Key2 == 0. OpenSSL 3 refuses to encrypt with it and so does cryptsetup; so do we.
IEEE_VECTOR_1_KEY = bytes(32)

PATHS = ["native", "reference"]


def cipher(key: bytes, sector_size: int, path: str, **kwargs: bool) -> XtsCipher:
    c = XtsCipher(key, sector_size, native=(path == "native"), **kwargs)
    assert c.native is (path == "native")
    return c


def pyca_sector(key: bytes, tweak: int, data: bytes, *, encrypt: bool = True) -> bytes:
    c = Cipher(algorithms.AES(key), modes.XTS(tweak.to_bytes(16, "little")))
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


# -- the native path is really there -------------------------------------------------------------


def test_native_path_is_built_and_used() -> None:
    assert native_available(), (
        "keysteward.crypto._xts_native did not build or load: `pip install -e .` and read its log"
    )
    backend = xts.native_backend()
    assert backend is not None
    assert backend.startswith(("vaes", "OpenSSL", "libgcrypt"))
    flags = set(Path("/proc/cpuinfo").read_text().split())
    # the same features the C code asks __builtin_cpu_supports for before it takes the VAES path
    cpu_has_vaes = {"aes", "avx512f", "avx512vl", "avx512bw", "vaes", "vpclmulqdq"} <= flags
    if cpu_has_vaes and not os.environ.get("KEYSTEWARD_XTS_NO_VAES"):
        assert backend.startswith("vaes"), backend  # the fast path must be the one in use where the CPU has it
    with XtsCipher(KEY256, 4096) as c:
        assert c.native
        assert "native" in repr(c)


# -- known answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(IEEE_VECTORS))
def test_ieee1619_vectors(name: str, path: str) -> None:
    key, unit, plaintext, ciphertext_hex = IEEE_VECTORS[name]
    ciphertext = bytes.fromhex(ciphertext_hex)
    if len(plaintext) == 512:
        # A 512-byte data unit is one dm-crypt sector: the default tweak rules apply as they are.
        c = cipher(key, 512, path)
    else:
        c = cipher(key, len(plaintext), path, iv_large_sectors=True)
    assert c.encrypt(plaintext, unit) == ciphertext
    assert c.decrypt(ciphertext, unit) == plaintext
    if len(plaintext) == 512:
        assert encrypt_sectors_reference(key, 512, plaintext, unit) == ciphertext
        assert decrypt_sectors_reference(key, 512, ciphertext, unit) == plaintext
    else:
        assert encrypt_sectors_reference(key, len(plaintext), plaintext, unit, iv_large_sectors=True) == ciphertext


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("key", [IEEE_VECTOR_1_KEY, bytes(64), bytes([7] * 32), KEY256[:32] * 2])
def test_equal_key_halves_are_refused(key: bytes, path: str) -> None:
    with pytest.raises(ValueError, match=HALVES_DIFFER):
        XtsCipher(key, 512, native=(path == "native"))
    with pytest.raises(ValueError, match=HALVES_DIFFER):
        encrypt_sectors_reference(key, 512, bytes(512), 0)
    with pytest.raises(ValueError, match=HALVES_DIFFER):  # OpenSSL itself would decrypt; cryptsetup would not
        decrypt_sectors_reference(key, 512, bytes(512), 0)


# -- tweak rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sector_size", [512, 1024, 2048, 4096])
@pytest.mark.parametrize("first_sector", [0, 8, 2**32 - 8, 2**32 + 16, 2**63 + 800])
def test_tweak_counts_512_byte_units(path: str, sector_size: int, first_sector: int) -> None:
    """LUKS2 (no iv_large_sectors): sector k of a call has tweak first_sector + iv_shift + k * sector_size/512."""
    data = os.urandom(3 * sector_size)
    iv_shift = 5
    got = cipher(KEY256, sector_size, path).encrypt(data, first_sector, iv_shift=iv_shift)
    step = sector_size // 512
    expected = b"".join(
        pyca_sector(KEY256, first_sector + iv_shift + k * step, data[k * sector_size : (k + 1) * sector_size])
        for k in range(3)
    )
    assert got == expected


@pytest.mark.parametrize("path", PATHS)
def test_iv_large_sectors_counts_sector_units(path: str) -> None:
    data = os.urandom(3 * 4096)
    got = cipher(KEY128, 4096, path, iv_large_sectors=True).encrypt(data, 10, iv_shift=2)
    expected = b"".join(pyca_sector(KEY128, 12 + k, data[k * 4096 : (k + 1) * 4096]) for k in range(3))
    assert got == expected


@pytest.mark.parametrize("path", PATHS)
def test_last_64_bit_tweak_is_allowed_and_beyond_is_refused(path: str) -> None:
    c = cipher(KEY128, 4096, path)
    last_first = U64 - 1 - 8  # two sectors: tweaks 2^64-9 and 2^64-1
    data = os.urandom(8192)
    assert c.encrypt(data, last_first) == b"".join(
        pyca_sector(KEY128, last_first + 8 * k, data[k * 4096 : (k + 1) * 4096]) for k in range(2)
    )
    with pytest.raises(ValueError, match="2\\^64"):
        c.encrypt(data, last_first + 1)
    with pytest.raises(ValueError, match="2\\^64"):
        c.encrypt(data[:4096], U64 - 4, iv_shift=4)
    with pytest.raises(ValueError, match="negative"):
        c.encrypt(data, -8)
    with pytest.raises(ValueError, match="negative"):
        c.encrypt(data, 0, iv_shift=-1)


# -- native == reference -------------------------------------------------------------------------

SECTOR_CASES = [(512, False), (1024, False), (2048, False), (4096, False), (16, True), (48, True), (4096, True)]
FIRST_SECTORS = [0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**32 + 123, 2**40 + 8, 2**63, U64 - 2**40]
IV_SHIFTS = [0, 1, 2**33]


@pytest.mark.parametrize("key", [KEY128, KEY256], ids=["aes128", "aes256"])
@pytest.mark.parametrize(("sector_size", "large"), SECTOR_CASES)
def test_native_equals_reference(key: bytes, sector_size: int, large: bool) -> None:
    native = XtsCipher(key, sector_size, iv_large_sectors=large, native=True)
    for first_sector in FIRST_SECTORS:
        for iv_shift in IV_SHIFTS:
            data = os.urandom(sector_size * 5)
            enc = native.encrypt(data, first_sector, iv_shift=iv_shift)
            ref = encrypt_sectors_reference(key, sector_size, data, first_sector, iv_shift, iv_large_sectors=large)
            assert enc == ref, (first_sector, iv_shift)
            assert native.decrypt(enc, first_sector, iv_shift=iv_shift) == data
            assert decrypt_sectors_reference(key, sector_size, enc, first_sector, iv_shift, iv_large_sectors=large) == (
                data
            )


@BOUNDED
@given(
    key=st.binary(min_size=32, max_size=32) | st.binary(min_size=64, max_size=64),
    sector_size=st.sampled_from([512, 1024, 2048, 4096]),
    n_sectors=st.integers(min_value=0, max_value=6),
    first_sector=st.integers(min_value=0, max_value=U64 - 2**16),
    iv_shift=st.integers(min_value=0, max_value=2**12),
    seed=st.binary(min_size=16, max_size=16),
)
def test_property_native_equals_reference_and_round_trips(
    key: bytes, sector_size: int, n_sectors: int, first_sector: int, iv_shift: int, seed: bytes
) -> None:
    half = len(key) // 2
    if key[:half] == key[half:]:
        key = key[:half] + bytes(b ^ 1 for b in key[half:])
    data = seed * (sector_size // 16 * n_sectors)
    data = bytes(b ^ (i & 0xFF) for i, b in enumerate(data))
    with XtsCipher(key, sector_size, native=True) as c:
        enc = c.encrypt(data, first_sector, iv_shift=iv_shift)
        assert enc == encrypt_sectors_reference(key, sector_size, data, first_sector, iv_shift)
        assert c.decrypt(enc, first_sector, iv_shift=iv_shift) == data
        if data:
            assert enc != data


# -- calls and buffers ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_round_trip_and_types(path: str) -> None:
    c = cipher(KEY256, 4096, path)
    data = os.urandom(4096 * 4)
    enc = c.encrypt(data, 4096)
    assert isinstance(enc, bytes)
    assert enc != data
    assert c.decrypt(enc, 4096) == data
    assert c.encrypt(bytearray(data), 4096) == enc
    assert c.encrypt(memoryview(data), 4096) == enc
    words = array.array("I", data)  # a buffer whose items are not bytes
    assert c.encrypt(memoryview(words), 4096) == enc
    assert c.decrypt(enc, 4096 + 8) != data  # another sector number gives other bytes
    assert c.encrypt(b"", 0) == b""
    assert c.sector_size == 4096


@pytest.mark.parametrize("path", PATHS)
def test_out_buffer(path: str) -> None:
    c = cipher(KEY128, 512, path)
    data = os.urandom(512 * 6)
    expected = c.encrypt(data, 99)

    out = bytearray(len(data))
    result = c.encrypt(data, 99, out=out)
    assert isinstance(result, memoryview)
    assert result == expected
    assert out == expected

    bigger = bytearray(b"\xaa" * (len(data) + 100))  # only the first len(data) bytes are written
    result = c.encrypt(data, 99, out=memoryview(bigger))
    assert len(result) == len(data)
    assert bigger[: len(data)] == expected
    assert bigger[len(data) :] == b"\xaa" * 100

    in_place = bytearray(data)
    c.encrypt(in_place, 99, out=in_place)
    assert in_place == expected
    c.decrypt(in_place, 99, out=in_place)
    assert in_place == data

    # out overlapping data by part of it (a shifted copy inside one buffer)
    shared = bytearray(data + bytes(512))
    view = memoryview(shared)
    c.encrypt(view[: len(data)], 99, out=view[512:])
    assert shared[512:] == expected

    with pytest.raises(ValueError, match="out holds"):
        c.encrypt(data, 99, out=bytearray(len(data) - 1))
    with pytest.raises(TypeError, match="writable"):
        c.encrypt(data, 99, out=memoryview(bytes(len(data))))


@pytest.mark.parametrize("path", PATHS)
def test_wrong_lengths_and_arguments(path: str) -> None:
    for bad_key_len in (0, 16, 31, 33, 48, 63, 65, 128):
        with pytest.raises(ValueError, match="32-byte"):
            XtsCipher(os.urandom(bad_key_len), 512, native=(path == "native"))
        with pytest.raises(ValueError, match="32-byte"):
            encrypt_sectors_reference(os.urandom(bad_key_len), 512, bytes(512), 0)
    for bad_size in (0, 16, 256, 511, 513, 520, 1536, 3072, 8192, -512):
        with pytest.raises(ValueError, match="sector_size"):
            XtsCipher(KEY128, bad_size, native=(path == "native"))
    for bad_size in (0, 8, 17, 4112):
        with pytest.raises(ValueError, match="sector_size"):
            XtsCipher(KEY128, bad_size, iv_large_sectors=True, native=(path == "native"))
    with pytest.raises(TypeError):
        XtsCipher(KEY128, True, native=(path == "native"))
    with pytest.raises(TypeError):
        XtsCipher("not bytes", 512, native=(path == "native"))  # type: ignore[arg-type]

    c = cipher(KEY128, 4096, path)
    for bad_len in (1, 16, 512, 4095, 4097, 8191):
        with pytest.raises(ValueError, match="not a multiple of the sector size 4096"):
            c.encrypt(bytes(bad_len), 0)
        with pytest.raises(ValueError, match="not a multiple"):
            c.decrypt(bytes(bad_len), 0)
        with pytest.raises(ValueError, match="not a multiple"):
            encrypt_sectors_reference(KEY128, 4096, bytes(bad_len), 0)
    with pytest.raises(TypeError):
        c.encrypt(bytes(4096), 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="contiguous"):
        c.encrypt(memoryview(bytes(8192))[::2], 0)


@pytest.mark.parametrize("path", PATHS)
def test_close(path: str) -> None:
    c = cipher(KEY256, 512, path)
    c.encrypt(bytes(512), 0)
    c.close()
    assert c.closed
    assert "closed" in repr(c)
    with pytest.raises(ValueError, match="closed"):
        c.encrypt(bytes(512), 0)
    with pytest.raises(ValueError, match="closed"):
        c.decrypt(bytes(512), 0, out=bytearray(512))
    with pytest.raises(ValueError, match="closed"):
        c.encrypt(b"", 0)
    c.close()  # idempotent
    with XtsCipher(KEY256, 512, native=(path == "native")) as ctx:
        assert not ctx.closed
    assert ctx.closed


def test_forcing_native_without_the_extension_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xts, "native_module", lambda: None)
    assert not native_available()
    with pytest.raises(RuntimeError, match="not built"):
        XtsCipher(KEY128, 512, native=True)
    fallback = XtsCipher(KEY128, 512)  # transparent fallback
    assert not fallback.native
    assert fallback.encrypt(PATTERN_512, 3) == encrypt_sectors_reference(KEY128, 512, PATTERN_512, 3)


# -- threads -------------------------------------------------------------------------------------


def _run_threads(jobs: list[tuple[XtsCipher, bytes, int]], rounds: int) -> list[list[bytes]]:
    results: list[list[bytes]] = [[] for _ in jobs]
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        c, data, first = jobs[index]
        try:
            start.wait()
            for r in range(rounds):
                enc = c.encrypt(data, first + r * 8)
                dec = c.decrypt(enc, first + r * 8)
                results[index].append(bytes(enc) + bytes(dec))
        except BaseException as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_two_threads_give_the_same_bytes_as_one() -> None:
    data_a, data_b = os.urandom(256 * 1024), os.urandom(256 * 1024)
    rounds = 20
    serial = []
    for key, data, first in ((KEY256, data_a, 0), (KEY128, data_b, 2**40)):
        with XtsCipher(key, 4096) as c:
            serial.append([bytes(c.encrypt(data, first + r * 8)) + data for r in range(rounds)])
    ca, cb = XtsCipher(KEY256, 4096), XtsCipher(KEY128, 4096)
    parallel = _run_threads([(ca, data_a, 0), (cb, data_b, 2**40)], rounds)
    assert parallel == serial


def test_one_cipher_shared_by_threads_stays_correct() -> None:
    shared = XtsCipher(KEY256, 4096)
    inputs = [(os.urandom(64 * 1024), 8 * 1000 * i) for i in range(4)]
    rounds = 15
    expected = [[encrypt_sectors_reference(KEY256, 4096, d, f + r * 8) + d for r in range(rounds)] for d, f in inputs]
    got = _run_threads([(shared, d, f) for d, f in inputs], rounds)
    assert got == expected
