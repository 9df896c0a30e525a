"""``keysteward volume`` against cryptsetup 2.6, both ways, headers and data.

- volumes cryptsetup formats (each KDF, both sector sizes, both key sizes, several keyslots, labels,
  tokens) open with ``keysteward volume check`` and ``read``;
- volumes ``keysteward volume create`` makes pass ``luksDump``, ``open --test-passphrase``, and
  ``luksDump --dump-volume-key`` prints the key keysteward holds;
- data encrypted in place by cryptsetup's userspace engine (``reencrypt --encrypt``) reads back
  through ``keysteward volume read``; data ``keysteward volume write`` wrote survives
  ``cryptsetup reencrypt`` (decrypt with the old key, encrypt with a new one) and reads back.

Everything runs on plain files with low KDF costs; no device-mapper is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keysteward.crypto.xts_reference import decrypt_sectors_reference
from keysteward.volume import LuksVolume
from tests.integration.test_volume_tools import (
    CS_ARGON2_SMALL,
    CS_PBKDF2_FAST,
    MIB,
    PBKDF2_FAST,
    keyfile,
    ks,
    pattern,
    run,
    tool,
    volume_key_from_cryptsetup,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cryptsetup() -> str:
    return tool("cryptsetup", "cryptsetup-bin")


def _blank(path: Path, size: int) -> Path:
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


# -- LUKS2 made by cryptsetup, opened by keysteward --------------------------------------------------

CRYPTSETUP_CASES = {
    "pbkdf2-sha256-k512-s512": ([*CS_PBKDF2_FAST, "--hash", "sha256"], 512, 512),
    "pbkdf2-sha512-k256-s4096": ([*CS_PBKDF2_FAST, "--hash", "sha512"], 256, 4096),
    "argon2id-k512-s4096": (CS_ARGON2_SMALL, 512, 4096),
    "argon2id-k256-s512": (CS_ARGON2_SMALL, 256, 512),
    "argon2i-k512-s512": ([*CS_ARGON2_SMALL[2:], "--pbkdf", "argon2i"], 512, 512),
}


@pytest.mark.parametrize("case", sorted(CRYPTSETUP_CASES))
def test_cryptsetup_volume_opens_in_keysteward(cryptsetup: str, tmp_path: Path, case: str) -> None:
    kdf_args, key_bits, sector = CRYPTSETUP_CASES[case]
    image = _blank(tmp_path / "v.img", 20 * MIB)
    first = keyfile(tmp_path / "first", b"first passphrase")
    second = keyfile(tmp_path / "second", b"second\npassphrase\x00\n")  # bytes as they are: no stripping
    base = [cryptsetup, "--batch-mode", *kdf_args]
    run([*base, "luksFormat", "--type", "luks2", "--key-file", str(first), "--key-size", str(key_bits),
         "--sector-size", str(sector), "--label", f"ks-{case}", str(image)])  # fmt: skip
    run([*base, "luksAddKey", "--key-file", str(first), str(image), str(second)])
    token = keyfile(tmp_path / "token.json", json.dumps({"type": "x-test", "keyslots": ["1"], "secret": "s"}).encode())
    run([cryptsetup, "token", "import", "--json-file", str(token), str(image)])

    info = json.loads(ks("dump", image, "--json").stdout)
    assert info["version"] == 2 and info["label"] == f"ks-{case}"
    assert [s["id"] for s in info["keyslots"]] == [0, 1]
    assert {s["key_bits"] for s in info["keyslots"]} == {key_bits}
    assert info["segments"][0]["sector_size"] == sector
    assert info["tokens"] == [{"id": 0, "type": "x-test", "keyslots": [1]}]
    assert '"s"' not in json.dumps(info["tokens"]), "token contents are not shown"
    assert info["payload"] == {"offset": 16 * MIB, "size": 4 * MIB}

    for number, key_file in enumerate([first, second]):
        assert json.loads(ks("check", image, "--passphrase-file", key_file, "--json").stdout)["keyslot"] == number
    wrong = keyfile(tmp_path / "wrong", b"first passphrase\n")
    assert ks("check", image, "--passphrase-file", wrong, check=False).returncode != 0

    # the payload keysteward decrypts is what the reference XTS gives with cryptsetup's volume key
    key = volume_key_from_cryptsetup(cryptsetup, image, first)
    with LuksVolume.open(str(image), first.read_bytes()) as volume:
        assert volume.export_volume_key() == key
    raw = image.read_bytes()[16 * MIB :]
    offset, length = 3 * sector + 100, 2 * sector + 7
    out = ks("read", image, "--passphrase-file", second, "--offset", offset, "--length", length).stdout
    first_sector = offset // sector * sector
    cipher = raw[first_sector : first_sector + 4 * sector]
    plain = decrypt_sectors_reference(key, sector, cipher, first_sector // 512)
    assert out == plain[offset - first_sector : offset - first_sector + length]


# -- made by keysteward, checked by cryptsetup -------------------------------------------------------

KEYSTEWARD_CASES = {
    "pbkdf2-k512-s4096": ([*PBKDF2_FAST], 512, 4096),
    "pbkdf2-k256-s512": ([*PBKDF2_FAST], 256, 512),
    "argon2id-k512-s512": (
        ["--kdf", "argon2id", "--pbkdf-memory", "16384", "--pbkdf-iterations", "2", "--pbkdf-parallel", "2"],
        512,
        512,
    ),
}


@pytest.mark.parametrize("case", sorted(KEYSTEWARD_CASES))
def test_keysteward_volume_passes_cryptsetup(cryptsetup: str, tmp_path: Path, case: str) -> None:
    kdf_args, key_bits, sector = KEYSTEWARD_CASES[case]
    image = tmp_path / "v.img"
    first = keyfile(tmp_path / "first", b"one\n")
    second = keyfile(tmp_path / "second", b"\x00\xfftwo")
    made = json.loads(
        ks(
            "create",
            image,
            "--size",
            "8M",
            "--passphrase-file",
            first,
            "--sector-size",
            sector,
            "--key-size",
            key_bits,
            "--label",
            "made-by-ks",
            *kdf_args,
            "--json",
        ).stdout
    )
    assert (made["version"], made["keyslot"], made["payload_size"], made["new_file"]) == (2, 0, 8 * MIB, True)
    assert image.stat().st_size == 16 * MIB + 8 * MIB and image.stat().st_mode & 0o777 == 0o600
    assert image.stat().st_blocks * 512 < 4 * MIB, "a new volume file is sparse"
    added = json.loads(ks("add-key", image, "--passphrase-file", first, "--new-passphrase-file", second,
                          *PBKDF2_FAST, "--json").stdout)  # fmt: skip
    assert added["keyslot"] == 1 and added["opened_with"] == 0

    dump = run([cryptsetup, "luksDump", str(image)]).stdout.decode()
    assert "Version:       \t2" in dump and "made-by-ks" in dump and f"sector: {sector} [bytes]" in dump
    assert "  0: luks2" in dump and "  1: luks2" in dump and f"Key:        {key_bits} bits" in dump
    for key_file in (first, second):
        run([cryptsetup, "open", "--test-passphrase", "--key-file", str(key_file), str(image)])
    wrong = keyfile(tmp_path / "wrong", b"one")
    assert run([cryptsetup, "open", "--test-passphrase", "--key-file", str(wrong), str(image)], check=False).returncode

    with LuksVolume.open(str(image), second.read_bytes()) as volume:
        assert volume.keyslot == 1
        assert volume.export_volume_key() == volume_key_from_cryptsetup(cryptsetup, image, first)
        assert len(volume.export_volume_key()) == key_bits // 8

    assert json.loads(ks("remove-key", image, "--slot", 0, "--passphrase-file", second, "--json").stdout) == {
        "path": str(image), "removed": 0, "opened_with": 1,
    }  # fmt: skip
    assert run([cryptsetup, "open", "--test-passphrase", "--key-file", str(first), str(image)], check=False).returncode
    run([cryptsetup, "open", "--test-passphrase", "--key-file", str(second), str(image)])
    assert "  0: luks2" not in run([cryptsetup, "luksDump", str(image)]).stdout.decode()


# -- the data path, both ways ------------------------------------------------------------------------


@pytest.mark.parametrize(("sector", "key_bits"), [(512, 512), (4096, 256)])
def test_data_cryptsetup_encrypted_reads_back(cryptsetup: str, tmp_path: Path, sector: int, key_bits: int) -> None:
    size, reduce = 48 * MIB, 32 * MIB
    content = pattern(size, seed=sector)
    image = tmp_path / "disk.img"
    image.write_bytes(content)
    pw = keyfile(tmp_path / "pw", b"encrypt me")
    run([cryptsetup, "reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size", f"{reduce // MIB}M",
         "--force-offline-reencrypt", "--batch-mode", "--key-file", str(pw), "--sector-size", str(sector),
         "--key-size", str(key_bits), *CS_PBKDF2_FAST, str(image)])  # fmt: skip
    assert image.read_bytes()[16 * MIB : 17 * MIB] != content[:MIB], "cryptsetup encrypted the data"
    kept = size - reduce  # the data that fits the smaller device
    out = tmp_path / "out.bin"
    ks("read", image, "--passphrase-file", pw, "--length", kept, "--output", out)
    assert out.read_bytes() == content[:kept]
    # unaligned pieces, from the middle and across chunk boundaries
    for offset, length in [(1, 1), (sector - 3, 10), (4 * MIB - 5, 11), (kept - 700, 700), (123457, 3 * MIB + 1)]:
        piece = ks("read", image, "--passphrase-file", pw, "--offset", offset, "--length", length).stdout
        assert piece == content[offset : offset + length], (offset, length)


@pytest.mark.parametrize("sector", [512, 4096])
def test_data_keysteward_wrote_survives_cryptsetup_reencrypt(cryptsetup: str, tmp_path: Path, sector: int) -> None:
    image = tmp_path / "v.img"
    pw = keyfile(tmp_path / "pw", b"keep my data")
    ks("create", image, "--size", "12M", "--passphrase-file", pw, "--sector-size", sector, *PBKDF2_FAST)
    expected = bytearray(ks("read", image, "--passphrase-file", pw).stdout)
    writes = [(0, pattern(5 * MIB, 1)), (5 * MIB + 13, pattern(3 * MIB + 1001, 2)), (12 * MIB - 77, pattern(77, 3)),
              (sector + 1, pattern(sector - 2, 4))]  # fmt: skip
    for offset, data in writes:
        src = keyfile(tmp_path / "in.bin", data)
        ks("write", image, "--passphrase-file", pw, "--offset", offset, "--input", src)
        expected[offset : offset + len(data)] = data
    assert ks("read", image, "--passphrase-file", pw).stdout == bytes(expected)
    old_key = volume_key_from_cryptsetup(cryptsetup, image, pw)

    run([cryptsetup, "reencrypt", "--force-offline-reencrypt", "--batch-mode", "--key-file", str(pw),
         *CS_PBKDF2_FAST, str(image)])  # fmt: skip
    new_key = volume_key_from_cryptsetup(cryptsetup, image, pw)
    assert new_key != old_key, "cryptsetup re-encrypted under a new volume key"
    assert ks("read", image, "--passphrase-file", pw).stdout == bytes(expected)
    # and keysteward writes under the new key, which cryptsetup's next reencryption reads correctly
    ks("write", image, "--passphrase-file", pw, "--offset", 7, input=b"after reencrypt")
    expected[7:22] = b"after reencrypt"
    run([cryptsetup, "reencrypt", "--force-offline-reencrypt", "--batch-mode", "--key-file", str(pw),
         *CS_PBKDF2_FAST, str(image)])  # fmt: skip
    assert ks("read", image, "--passphrase-file", pw).stdout == bytes(expected)


def test_keysteward_luks1_volume_passes_cryptsetup(cryptsetup: str, tmp_path: Path) -> None:
    image, pw = tmp_path / "v1.img", keyfile(tmp_path / "pw", b"luks one")
    ks("create", image, "--size", "2M", "--luks1", "--sector-size", 512, "--key-size", 256, "--passphrase-file", pw,
       "--pbkdf-iterations", 1000)  # fmt: skip
    dump = run([cryptsetup, "luksDump", str(image)]).stdout.decode()
    assert "Version:       \t1" in dump and "xts-plain64" in dump and "Key Slot 0: ENABLED" in dump
    run([cryptsetup, "open", "--test-passphrase", "--key-file", str(pw), str(image)])
    data = pattern(MIB + 17, 9)
    ks("write", image, "--passphrase-file", pw, "--offset", 511, input=data)
    with LuksVolume.open(str(image), pw.read_bytes()) as volume:
        key = volume.export_volume_key()
        assert key == volume_key_from_cryptsetup(cryptsetup, image, pw) and len(key) == 32
        offset = volume.geometry.data_offset
    raw = image.read_bytes()[offset:]
    plain = decrypt_sectors_reference(key, 512, raw[: 2 * MIB], 0)  # LUKS1: IVs from 0 at the payload
    assert plain[511 : 511 + len(data)] == data
