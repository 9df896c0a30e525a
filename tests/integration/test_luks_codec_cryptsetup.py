"""The LUKS codecs against the real tools, both ways: cryptsetup 2.6 (LUKS2 and LUKS1) and QEMU (LUKS1).

Volumes cryptsetup makes parse, re-encode byte for byte, and open with each passphrase to the volume
key that ``luksDump --dump-volume-key`` prints; volumes the codec makes pass ``luksDump``,
``open --test-passphrase`` and dump the key the codec used. Everything runs on plain files (no
device-mapper) with low KDF costs. The tools come from Debian (cryptsetup-bin, qemu-utils), which the
test command installs; a missing tool fails the test, it never skips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from keysteward.formats import luks
from tests.support.tools import qemu_img_create, tool

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SIZE = 20 * MIB
ARGON2 = ["--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "1"]


@pytest.fixture(scope="module")
def cryptsetup() -> str:
    return tool("cryptsetup", "cryptsetup-bin")


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _keyfile(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _blank(path: Path, size: int = SIZE) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


def _volume_key(cryptsetup: str, image: Path, keyfile: Path) -> bytes:
    out = _run([cryptsetup, "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", str(keyfile), str(image)])
    found = re.search(r"(?:MK dump|Volume key):\s*((?:[0-9a-f]{2}\s*)+)", out.stdout)
    assert found, f"no volume key in luksDump output:\n{out.stdout}"
    return bytes.fromhex("".join(found.group(1).split()))


def _test_passphrase(cryptsetup: str, image: Path, keyfile: Path) -> bool:
    done = _run([cryptsetup, "open", "--test-passphrase", "--key-file", str(keyfile), str(image)], check=False)
    return done.returncode == 0


def _read2(image: Path) -> tuple[luks.Luks2Header, bytes]:
    data = image.read_bytes()
    return luks.read_luks2(data[: luks.MAX_SPAN], device_size=len(data)), data


def _apply(image: Path, writes: Sequence[luks.Write]) -> None:
    with image.open("r+b") as fh:
        for write in writes:
            fh.seek(write.offset)
            fh.write(write.data)


# -- LUKS2 made by cryptsetup ---------------------------------------------------------------------

CRYPTSETUP_LUKS2 = {
    "pbkdf2-sha256-k512-s512": (
        ["--pbkdf", "pbkdf2", "--hash", "sha256", "--pbkdf-force-iterations", "1000"],
        512,
        512,
    ),
    "pbkdf2-sha512-k256-s4096": (
        ["--pbkdf", "pbkdf2", "--hash", "sha512", "--pbkdf-force-iterations", "1000"],
        256,
        4096,
    ),
    "argon2id-k512-s4096": (["--pbkdf", "argon2id", *ARGON2], 512, 4096),
    "argon2i-k256-s512": (["--pbkdf", "argon2i", *ARGON2], 256, 512),
}


@pytest.mark.parametrize("case", sorted(CRYPTSETUP_LUKS2))
def test_cryptsetup_luks2_opens_in_keysteward(cryptsetup: str, tmp_path: Path, case: str) -> None:
    kdf_args, key_bits, sector = CRYPTSETUP_LUKS2[case]
    image = _blank(tmp_path / "v.img")
    first = _keyfile(tmp_path, "first", b"first passphrase")
    second = _keyfile(tmp_path, "second", b"second\npassphrase\x00")
    base = [cryptsetup, "--batch-mode", *kdf_args]
    _run([*base, "luksFormat", "--type", "luks2", "--key-file", str(first), "--key-size", str(key_bits),
          "--sector-size", str(sector), "--label", f"ks-{case}", str(image)])  # fmt: skip
    _run([*base, "luksAddKey", "--key-file", str(first), str(image), str(second)])
    token = {"type": "x-keysteward-test", "keyslots": ["1"], "note": "ünïcode/ok", "nested": {"n": [1, 2]}}
    token_file = _keyfile(tmp_path, "token.json", json.dumps(token).encode())
    _run([cryptsetup, "token", "import", "--json-file", str(token_file), str(image)])

    header, data = _read2(image)
    meta = header.metadata
    assert (header.label, header.source, header.needs_repair) == (f"ks-{case}", "primary", False)
    assert list(meta.keyslots) == [0, 1] and meta.digests[0].keyslots == (0, 1)
    assert {k.key_size for k in meta.keyslots.values()} == {key_bits // 8}
    assert meta.segments[0].sector_size == sector and meta.segments[0].size is None
    assert meta.tokens[0].type == "x-keysteward-test" and meta.tokens[0].data["note"] == "ünïcode/ok"
    primary, secondary = luks.serialize_luks2(header, seqid=header.seqid)
    assert primary.data + secondary.data == data[: 2 * header.hdr_size], "re-encoding is not byte-stable"

    expected = _volume_key(cryptsetup, image, first)

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    for number, keyfile in enumerate([first, second]):
        unlocked = luks.unlock(meta, read, keyfile.read_bytes())
        assert unlocked.keyslot == number and bytes(unlocked.volume_key) == expected
    with pytest.raises(luks.LuksWrongPassphrase):
        luks.unlock(meta, read, b"first passphrase\n")


def test_damaged_primary_recovers_from_secondary(cryptsetup: str, tmp_path: Path) -> None:
    image = _blank(tmp_path / "v.img")
    keyfile = _keyfile(tmp_path, "pw", b"pw")
    _run([cryptsetup, "--batch-mode", "luksFormat", "--type", "luks2", "--key-file", str(keyfile),
          "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(image)])  # fmt: skip
    expected = _volume_key(cryptsetup, image, keyfile)
    with image.open("r+b") as fh:
        fh.seek(4096 + 40)
        byte = fh.read(1)
        fh.seek(4096 + 40)
        fh.write(bytes([byte[0] ^ 0xFF]))

    header, data = _read2(image)
    assert header.source == "secondary" and header.needs_repair
    unlocked = luks.unlock(header.metadata, lambda o, n: data[o : o + n], b"pw")
    assert bytes(unlocked.volume_key) == expected

    _apply(image, luks.serialize_luks2(header))  # the codec's repair: both copies, seqid + 1
    repaired, _ = _read2(image)
    assert (repaired.source, repaired.needs_repair, repaired.seqid) == ("primary", False, header.seqid + 1)
    assert _run([cryptsetup, "luksDump", str(image)]).returncode == 0
    assert _test_passphrase(cryptsetup, image, keyfile)


# -- LUKS2 made by keysteward ----------------------------------------------------------------------

KEYSTEWARD_LUKS2: dict[str, tuple[Callable[[], luks.KdfParams], int, int, str]] = {
    "pbkdf2-sha256-k512-s512": (lambda: luks.new_pbkdf2(hash="sha256"), 64, 512, "sha256"),
    "pbkdf2-sha512-k256-s4096": (lambda: luks.new_pbkdf2(hash="sha512"), 32, 4096, "sha512"),
    "argon2id-k512-s4096": (lambda: luks.new_argon2("argon2id", time=4, memory_kib=32768, cpus=1), 64, 4096, "sha256"),
    "argon2i-k256-s512": (lambda: luks.new_argon2("argon2i", time=4, memory_kib=32768, cpus=2), 32, 512, "sha256"),
}


@pytest.mark.parametrize("case", sorted(KEYSTEWARD_LUKS2))
def test_keysteward_luks2_opens_in_cryptsetup(cryptsetup: str, tmp_path: Path, case: str) -> None:
    make_kdf, key_size, sector, hash_name = KEYSTEWARD_LUKS2[case]
    image = _blank(tmp_path / "v.img")
    first = _keyfile(tmp_path, "first", b"first")
    volume_key = os.urandom(key_size)
    formatted = luks.format_luks2(
        volume_key, b"first", device_size=SIZE, kdf_params=make_kdf(), sector_size=sector, label="made by keysteward",
        af_hash=hash_name, digest_hash=hash_name,
    )  # fmt: skip
    _apply(image, formatted.writes)

    dump = _run([cryptsetup, "luksDump", str(image)]).stdout
    assert "made by keysteward" in dump and f"sector: {sector} [bytes]" in dump
    assert _test_passphrase(cryptsetup, image, first)
    assert not _test_passphrase(cryptsetup, image, _keyfile(tmp_path, "wrong", b"wrong"))
    assert _volume_key(cryptsetup, image, first) == volume_key

    # A second keyslot and a token, added by the codec.
    header, _ = _read2(image)
    offset, size = luks.allocate_area(header.metadata, key_size)
    keyslot, area = luks.make_keyslot(volume_key, b"second", kdf_params=make_kdf(), area_offset=offset, area_size=size)
    number, meta = luks.add_keyslot(header.metadata, keyslot)
    token = luks.Luks2Token("x-keysteward", (number,), {"type": "x-keysteward", "keyslots": [], "id": "abc"})
    meta = dataclasses.replace(meta, tokens={0: token})
    _apply(image, [area, *luks.serialize_luks2(header, meta)])
    assert _test_passphrase(cryptsetup, image, _keyfile(tmp_path, "second", b"second"))
    exported = _run([cryptsetup, "token", "export", "--token-id", "0", str(image)]).stdout
    assert json.loads(exported) == {"type": "x-keysteward", "keyslots": [str(number)], "id": "abc"}

    # cryptsetup changes our header; the codec reads its rewrite, byte for byte.
    _run([cryptsetup, "--batch-mode", "luksAddKey", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
          "--key-file", str(first), str(image), str(_keyfile(tmp_path, "third", b"third"))])  # fmt: skip
    header, data = _read2(image)
    assert sorted(header.metadata.keyslots) == [0, 1, 2]
    primary, secondary = luks.serialize_luks2(header, seqid=header.seqid)
    assert primary.data + secondary.data == data[: 2 * header.hdr_size]
    unlocked = luks.unlock(header.metadata, lambda o, n: data[o : o + n], b"third")
    assert (unlocked.keyslot, bytes(unlocked.volume_key)) == (2, volume_key)

    # The codec removes keyslot 0: cryptsetup no longer accepts its passphrase.
    meta, wipe = luks.remove_keyslot(header.metadata, 0)
    _apply(image, [wipe, *luks.serialize_luks2(header, meta)])
    assert not _test_passphrase(cryptsetup, image, first)
    assert _test_passphrase(cryptsetup, image, _keyfile(tmp_path, "third2", b"third"))


# -- LUKS1 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key_bits", "hash_name"), [(512, "sha256"), (256, "sha512")])
def test_cryptsetup_luks1_opens_in_keysteward(cryptsetup: str, tmp_path: Path, key_bits: int, hash_name: str) -> None:
    image = _blank(tmp_path / "v1.img")
    first = _keyfile(tmp_path, "first", b"one")
    second = _keyfile(tmp_path, "second", b"two")
    base = [cryptsetup, "--batch-mode", "--pbkdf-force-iterations", "1000", "--hash", hash_name]
    _run([*base, "luksFormat", "--type", "luks1", "--key-file", str(first), "--key-size", str(key_bits), str(image)])
    _run([*base, "luksAddKey", "--key-file", str(first), str(image), str(second)])
    data = image.read_bytes()
    header = luks.parse_luks1(data[:4096], device_size=len(data))
    assert (header.encryption, header.hash_spec, header.key_bytes) == ("aes-xts-plain64", hash_name, key_bits // 8)
    assert luks.serialize_luks1(header).data == data[:1024]
    expected = _volume_key(cryptsetup, image, first)
    for number, passphrase in enumerate([b"one", b"two"]):
        unlocked = luks.unlock_luks1(header, lambda o, n: data[o : o + n], passphrase)
        assert unlocked.keyslot == number and bytes(unlocked.volume_key) == expected
    with pytest.raises(luks.LuksWrongPassphrase):
        luks.unlock_luks1(header, lambda o, n: data[o : o + n], b"three")


def test_keysteward_luks1_opens_in_cryptsetup_and_qemu(cryptsetup: str, tmp_path: Path) -> None:
    qemu_io = tool("qemu-io", "qemu-utils")
    image = _blank(tmp_path / "v1.img")
    volume_key = os.urandom(64)
    formatted = luks.format_luks1(volume_key, b"one", device_size=SIZE)
    header, second = luks.set_luks1_keyslot(formatted.header, volume_key, b"two")
    _apply(image, [*formatted.writes, second, luks.serialize_luks1(header)])
    assert "Key Slot 1: ENABLED" in _run([cryptsetup, "luksDump", str(image)]).stdout
    one, two = _keyfile(tmp_path, "one", b"one"), _keyfile(tmp_path, "two", b"two")
    assert _test_passphrase(cryptsetup, image, one) and _test_passphrase(cryptsetup, image, two)
    assert not _test_passphrase(cryptsetup, image, _keyfile(tmp_path, "bad", b"bad"))
    assert _volume_key(cryptsetup, image, two) == volume_key
    for keyfile, ok in ((one, True), (_keyfile(tmp_path, "bad2", b"bad"), False)):
        opened = _run(
            [qemu_io, "--object", f"secret,id=s0,file={keyfile}", "--image-opts",
             f"driver=luks,key-secret=s0,file.filename={image}", "-c", "read 0 512"],
            check=False,
        )  # fmt: skip
        assert (opened.returncode == 0) == ok, opened.stderr


def test_qemu_luks1_opens_in_keysteward(cryptsetup: str, tmp_path: Path) -> None:
    qemu_img = tool("qemu-img", "qemu-utils")
    image = tmp_path / "q.img"
    secret = _keyfile(tmp_path, "secret", b"qemu secret")
    argv = [qemu_img, "create", "-q", "-f", "luks", "--object", f"secret,id=s0,file={secret}",
            "-o", "key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256,iter-time=10",
            str(image), "16M"]  # fmt: skip
    qemu_img_create(argv)
    data = image.read_bytes()
    header = luks.parse_luks1(data[:4096], device_size=len(data))
    assert (header.encryption, header.hash_spec, header.key_bytes) == ("aes-xts-plain64", "sha256", 64)
    unlocked = luks.unlock_luks1(header, lambda o, n: data[o : o + n], b"qemu secret")
    assert bytes(unlocked.volume_key) == _volume_key(cryptsetup, image, secret)
