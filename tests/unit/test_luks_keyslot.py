"""LUKS2 keyslots (keysteward.formats.luks.keyslot): open, verify, create, add, remove, order, limits."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable

import pytest

from keysteward.errors import Unauthenticated
from keysteward.formats import luks
from keysteward.formats.luks.errors import ARGON2_MEMORY, FULL, UNSUPPORTED, LuksFormatError

pytestmark = pytest.mark.unit

MIB = 1024 * 1024
DATA_OFFSET = MIB
DEVICE = DATA_OFFSET + 64 * 1024
FAST = luks.Pbkdf2Params("sha256", 1000, bytes(range(32)))


class Volume:
    """An in-memory LUKS2 volume built with the codec, with helpers to change it."""

    def __init__(self, key_size: int = 64, kdf: luks.KdfParams = FAST, seed: int = 5) -> None:
        self.rng = random.Random(seed).randbytes
        self.key = self.rng(key_size)
        formatted = luks.format_luks2(
            self.key, b"first", device_size=DEVICE, data_offset=DATA_OFFSET, kdf_params=kdf, rng=self.rng
        )
        self.image = bytearray(DEVICE)
        self.apply(formatted.writes)
        self.header = formatted.header

    @property
    def meta(self) -> luks.Luks2Metadata:
        return self.header.metadata

    def apply(self, writes: tuple[luks.Write, ...] | list[luks.Write]) -> None:
        for write in writes:
            self.image[write.offset : write.end] = write.data

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.image[offset : offset + length])

    def add(self, passphrase: bytes, kdf: luks.KdfParams = FAST, priority: int | None = None) -> int:
        offset, size = luks.allocate_area(self.meta, len(self.key))
        keyslot, write = luks.make_keyslot(
            self.key, passphrase, kdf_params=kdf, area_offset=offset, area_size=size, priority=priority, rng=self.rng
        )
        number, meta = luks.add_keyslot(self.meta, keyslot)
        self.commit(meta, [write])
        return number

    def commit(self, meta: luks.Luks2Metadata, writes: list[luks.Write]) -> None:
        self.apply(writes)
        self.apply(luks.serialize_luks2(self.header, meta))
        self.header = luks.read_luks2(bytes(self.image[: 2 * self.header.hdr_size]), device_size=DEVICE)


@pytest.mark.parametrize("key_size", [32, 64])
@pytest.mark.parametrize(
    "kdf",
    [
        FAST,
        luks.Pbkdf2Params("sha512", 1000, bytes(32)),
        luks.Argon2Params("argon2id", 1, 256, 2, bytes(32)),
        luks.Argon2Params("argon2i", 2, 128, 1, bytes(32)),
    ],
    ids=["pbkdf2-sha256", "pbkdf2-sha512", "argon2id", "argon2i"],
)
def test_open_with_each_kdf_and_key_size(key_size: int, kdf: luks.KdfParams) -> None:
    volume = Volume(key_size, kdf)
    unlocked = volume_unlock(volume, b"first")
    assert (unlocked.keyslot, unlocked.digest, bytes(unlocked.volume_key)) == (0, 0, volume.key)
    assert "volume_key=<" in repr(unlocked)


def volume_unlock(volume: Volume, passphrase: bytes, **kwargs: object) -> luks.Unlocked:
    return luks.unlock(volume.meta, volume.read, passphrase, **kwargs)  # type: ignore[arg-type]


def test_wrong_passphrase_is_a_clean_error() -> None:
    volume = Volume()
    with pytest.raises(luks.LuksWrongPassphrase) as info:
        volume_unlock(volume, b"wrong")
    assert isinstance(info.value, Unauthenticated) and info.value.code == "luks_wrong_passphrase"
    with pytest.raises(luks.LuksWrongPassphrase):
        luks.verify_digest(volume.meta.digests[0], bytes(64))


def test_several_keyslots_each_open() -> None:
    volume = Volume()
    assert volume.add(b"second") == 1
    assert volume.add(b"third", luks.Argon2Params("argon2id", 1, 64, 1, bytes(32))) == 2
    assert volume.meta.digests[0].keyslots == (0, 1, 2)
    for number, passphrase in enumerate([b"first", b"second", b"third"]):
        assert volume_unlock(volume, passphrase).keyslot == number
        assert bytes(volume_unlock(volume, passphrase, keyslot=number).volume_key) == volume.key
    with pytest.raises(luks.LuksWrongPassphrase):
        volume_unlock(volume, b"second", keyslot=0)
    areas = sorted((k.area.offset, k.area.size) for k in volume.meta.keyslots.values())
    assert all(a + s <= b for (a, s), (b, _) in itertools.pairwise(areas))


def _counting_kdf(calls: list[int]) -> Callable[[luks.KdfParams, bytes | bytearray, int], bytearray]:
    def kdf(params: luks.KdfParams, passphrase: bytes | bytearray, length: int) -> bytearray:
        assert isinstance(params, luks.Pbkdf2Params)
        calls.append(params.iterations)
        return luks.derive_key(params, passphrase, length)

    return kdf


def test_priority_order_and_injected_kdf() -> None:
    volume = Volume()
    volume.add(b"ignored", luks.Pbkdf2Params("sha256", 1001, bytes(32)), priority=0)
    volume.add(b"preferred", luks.Pbkdf2Params("sha256", 1002, bytes(32)), priority=2)
    calls: list[int] = []
    with pytest.raises(luks.LuksWrongPassphrase):
        volume_unlock(volume, b"nothing", kdf=_counting_kdf(calls))
    assert calls == [1002, 1000]  # preferred first, normal next, "ignore" never
    with pytest.raises(luks.LuksWrongPassphrase):
        volume_unlock(volume, b"ignored")
    assert volume_unlock(volume, b"ignored", keyslot=1).keyslot == 1


def test_injected_cipher_is_used() -> None:
    volume = Volume()
    seen: list[str] = []

    def cipher(encryption: str, key: bytes | bytearray, data: bytes, decrypt: bool) -> bytes:
        seen.append(encryption)
        return luks.xts_area_cipher(encryption, key, data, decrypt)

    assert volume_unlock(volume, b"first", cipher=cipher).keyslot == 0
    assert seen == ["aes-xts-plain64"]


def test_argon2_memory_limit() -> None:
    volume = Volume(kdf=luks.Argon2Params("argon2id", 1, 4096, 1, bytes(32)))
    with pytest.raises(LuksFormatError) as info:
        volume_unlock(volume, b"first", max_memory_kib=1024)
    assert info.value.code == ARGON2_MEMORY and "4096 KiB" in info.value.message
    volume.add(b"small")  # pbkdf2: opens even though keyslot 0 is too big
    assert volume_unlock(volume, b"small", max_memory_kib=1024).keyslot == 1
    with pytest.raises(LuksFormatError) as info:
        volume_unlock(volume, b"first", max_memory_kib=1024)
    assert info.value.code == ARGON2_MEMORY
    with pytest.raises(LuksFormatError):
        luks.make_keyslot(volume.key, b"x", kdf_params=volume.meta.keyslots[0].kdf, area_offset=0, max_memory_kib=1024)


def test_keyslot_area_beyond_the_file_is_a_format_error() -> None:
    volume = Volume()
    with pytest.raises(LuksFormatError, match="needed"):
        luks.unlock(volume.meta, lambda offset, length: b"", b"first")
    offset, length = luks.keyslot_span(volume.meta.keyslots[0])
    assert (offset, length) == (2 * 16384, 256000)


def test_remove_keyslot_unbinds_and_wipes() -> None:
    volume = Volume()
    volume.add(b"second")
    token = luks.Luks2Token("x-test", (0, 1), {"type": "x-test", "keyslots": ["0", "1"], "note": "kept"})
    volume.commit(dataclasses.replace(volume.meta, tokens={0: token}), [])
    meta, wipe = luks.remove_keyslot(volume.meta, 1)
    area = volume.meta.keyslots[1].area
    assert (wipe.offset, wipe.data) == (area.offset, bytes(area.size))
    volume.commit(meta, [wipe])
    assert list(volume.meta.keyslots) == [0]
    assert volume.meta.digests[0].keyslots == (0,)
    assert volume.meta.tokens[0].keyslots == (0,) and volume.meta.tokens[0].data["note"] == "kept"
    with pytest.raises(luks.LuksWrongPassphrase):
        volume_unlock(volume, b"second")
    assert volume.add(b"again") == 1  # the freed id and area are reused
    assert volume.meta.keyslots[1].area.offset == area.offset
    with pytest.raises(LuksFormatError):
        luks.remove_keyslot(volume.meta, 7)


def test_keyslot_area_runs_out() -> None:
    volume = Volume()
    with pytest.raises(LuksFormatError) as info:
        for n in range(40):
            volume.add(b"p%d" % n)
    assert info.value.code == FULL
    assert len(volume.meta.keyslots) == (DATA_OFFSET - 2 * 16384) // 258048


def test_add_keyslot_refuses_bad_ids() -> None:
    volume = Volume()
    keyslot = volume.meta.keyslots[0]
    for kwargs in ({"keyslot_id": 0}, {"keyslot_id": 32}, {"digest_id": 4}):
        with pytest.raises(LuksFormatError):
            luks.add_keyslot(volume.meta, keyslot, **kwargs)


def test_unbound_keyslot_and_unsupported_area_encryption() -> None:
    volume = Volume()
    unbound = dataclasses.replace(volume.meta, digests={0: dataclasses.replace(volume.meta.digests[0], keyslots=())})
    material = volume.read(*luks.keyslot_span(volume.meta.keyslots[0]))
    with pytest.raises(LuksFormatError) as info:
        luks.open_keyslot(unbound, 0, material, b"first")
    assert info.value.code == UNSUPPORTED
    with pytest.raises(luks.LuksWrongPassphrase):
        luks.unlock(unbound, volume.read, b"first")  # unbound keyslots are not tried
    assert bytes(luks.decrypt_keyslot(unbound.keyslots[0], material, b"first")) == volume.key
    cbc = dataclasses.replace(
        volume.meta.keyslots[0],
        area=dataclasses.replace(volume.meta.keyslots[0].area, encryption="aes-cbc-essiv:sha256"),
    )
    with pytest.raises(LuksFormatError) as info:
        luks.decrypt_keyslot(cbc, material, b"first")
    assert info.value.code == UNSUPPORTED
    with pytest.raises(LuksFormatError):
        luks.open_keyslot(volume.meta, 9, material, b"first")


def test_make_digest_matches_cryptsetup_shape() -> None:
    digest = luks.make_digest(bytes(64), keyslots=(0,), hash="sha512", iterations=1000)
    assert len(digest.digest) == 64 and len(digest.salt) == 32
    luks.verify_digest(digest, bytes(64))
