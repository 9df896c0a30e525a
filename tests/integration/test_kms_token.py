"""The ``keysteward`` LUKS2 token and keyslot (volume/kms_token.py), checked against cryptsetup 2.6:

- a bound volume passes ``luksDump`` (which shows the token), its keysteward keyslot opens with the
  secret through ``cryptsetup open --test-passphrase --key-slot N``, and the token reads back validated;
- binding an existing volume adds keyslot and token in one commit;
- shred removes keyslot and token; the old secret no longer opens anything, a break-glass slot still
  does, and when the keysteward slot was the only one cryptsetup still reads the header (no keyslot);
- malformed tokens (each field wrong in turn) are refused with ``kms_token_invalid``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from keysteward.formats import luks
from keysteward.volume.create import CreateOptions, create_volume
from keysteward.volume.device import Device
from keysteward.volume.errors import VolumeConflict, VolumeRequestError
from keysteward.volume.header_io import commit_luks2, read_header
from keysteward.volume.kdf import KdfChoice
from keysteward.volume.keyslots import add_key
from keysteward.volume.kms_token import (
    KEYSLOT_KDF,
    KmsRef,
    attach_token,
    bind,
    find_token,
    read_token,
    shred,
    verify_secret,
)
from keysteward.volume.luks_volume import LuksVolume
from tests.integration.test_volume_tools import MIB, run, tool

pytestmark = pytest.mark.integration

REF = KmsRef("https://kms.example:8443", "acme", "0b7a4a53-54c4-4fb0-8d0e-5b8f7c1e2a11", "volumes", 3)
FAST = KdfChoice(type="pbkdf2", iterations=1000)


@pytest.fixture(scope="module")
def cryptsetup() -> str:
    return tool("cryptsetup", "cryptsetup-bin")


def _bound(tmp_path: Path, secret: bytes, name: str = "v.img") -> Path:
    path = tmp_path / name
    create_volume(str(path), bytearray(secret), CreateOptions(size=4 * MIB, kdf=KEYSLOT_KDF))
    attach_token(str(path), REF, 0)
    return path


def _opens(cryptsetup: str, path: Path, secret: bytes, slot: int | None = None) -> bool:
    argv = [cryptsetup, "open", "--test-passphrase", "--key-file=-", str(path)]
    if slot is not None:
        argv[2:2] = ["--key-slot", str(slot)]
    return run(argv, input=secret, check=False).returncode == 0


def _dump(cryptsetup: str, path: Path) -> str:
    return run([cryptsetup, "luksDump", str(path)]).stdout.decode()


def test_bound_volume_is_valid_for_cryptsetup(tmp_path: Path, cryptsetup: str) -> None:
    secret = os.urandom(32)
    path = _bound(tmp_path, secret)
    token = read_token(str(path))
    assert (token.keyslot, token.ref) == (0, REF)
    dump = _dump(cryptsetup, path)
    assert "keysteward" in dump and "PBKDF2" in dump.upper()
    assert _opens(cryptsetup, path, secret, slot=0)
    assert not _opens(cryptsetup, path, os.urandom(32))
    verify_secret(str(path), token, bytearray(secret))
    with pytest.raises(luks.LuksWrongPassphrase):
        verify_secret(str(path), token, bytearray(os.urandom(32)))
    # the JSON on disk is the protocol's token, field for field, and cryptsetup reads it back
    exported = run([cryptsetup, "token", "export", "--token-id", str(token.token_id), str(path)]).stdout
    assert json.loads(exported) == {
        "type": "keysteward", "keyslots": ["0"], "protocol": "keysteward-release/1", "url": REF.url,
        "tenant": "acme", "volume_id": REF.volume_id, "key": "volumes", "key_version": 3,
    }  # fmt: skip
    with Device.open(str(path)) as device:
        kdf = read_header(device).v2.metadata.keyslots[0].kdf
    assert isinstance(kdf, luks.Pbkdf2Params) and (kdf.hash, kdf.iterations) == ("sha256", 1000)


def test_bind_existing_volume(tmp_path: Path, cryptsetup: str) -> None:
    path = tmp_path / "plain.img"
    create_volume(str(path), bytearray(b"break glass"), CreateOptions(size=4 * MIB, kdf=FAST))
    secret = os.urandom(32)
    token = bind(str(path), b"break glass", bytearray(secret), REF)
    assert token.keyslot == 1 and read_token(str(path)) == token
    assert _opens(cryptsetup, path, secret, slot=1) and _opens(cryptsetup, path, b"break glass", slot=0)
    with pytest.raises(VolumeConflict) as caught:
        bind(str(path), b"break glass", bytearray(os.urandom(32)), REF)
    assert caught.value.code == "kms_token_exists"
    with pytest.raises(VolumeRequestError) as bad:
        bind(str(path), b"break glass", bytearray(16), REF)
    assert bad.value.code == "kms_token_invalid"


def test_shred_keeps_break_glass(tmp_path: Path, cryptsetup: str) -> None:
    secret = os.urandom(32)
    path = _bound(tmp_path, secret)
    add_key(str(path), secret, b"recovery words", kdf=FAST)
    with LuksVolume.open(str(path), b"recovery words") as vol:
        key = vol.export_volume_key()
    done = shred(str(path))
    assert done.describe() == {
        "path": str(path),
        "removed_keyslot": 0,
        "removed_token": 0,
        "remaining_keyslots": [1],
        "openable": True,
    }
    assert not _opens(cryptsetup, path, secret)
    assert _opens(cryptsetup, path, b"recovery words")
    dump = _dump(cryptsetup, path)
    assert "keysteward" not in dump
    with pytest.raises(VolumeRequestError) as caught:
        read_token(str(path))
    assert caught.value.code == "kms_token_missing"
    with LuksVolume.open(str(path), b"recovery words") as vol:
        assert vol.export_volume_key() == key  # the data key did not change
    # the keyslot's area is zeros now: a copy of this header taken later holds nothing for the secret
    with Device.open(str(path)) as device:
        header = read_header(device)
        assert 0 not in header.v2.metadata.keyslots


def test_shred_of_only_keyslot_leaves_unopenable_but_valid_header(tmp_path: Path, cryptsetup: str) -> None:
    secret = os.urandom(32)
    path = _bound(tmp_path, secret)
    with Device.open(str(path)) as device:
        area = read_header(device).v2.metadata.keyslots[0].area
        before = device.pread(area.offset, area.size)
    done = shred(str(path))
    assert done.remaining_keyslots == () and not done.openable
    assert run([cryptsetup, "isLuks", str(path)], check=False).returncode == 0
    _dump(cryptsetup, path)  # still a header cryptsetup reads
    assert not _opens(cryptsetup, path, secret)
    with Device.open(str(path)) as device:
        assert before.strip(b"\x00") and device.pread(area.offset, area.size) == bytes(area.size)


def _tampered(path: Path, change: dict[str, object], keyslots: tuple[int, ...] | None = None) -> None:
    with Device.open(str(path), writable=True) as device:
        header = read_header(device)
        meta = header.v2.metadata
        token = meta.tokens[0]
        data = {k: v for k, v in {**token.data, **change}.items() if v is not None}
        new = replace(token, data=data, keyslots=keyslots or token.keyslots)
        commit_luks2(device, header, replace(meta, tokens={0: new}))


@pytest.mark.parametrize(
    "change",
    [
        {"protocol": "keysteward-release/2"},
        {"url": "ftp://kms.example"},
        {"url": "https://kms example"},
        {"url": "https://k/" + "a" * 3000},
        {"tenant": "Acme"},
        {"tenant": ""},
        {"tenant": 7},
        {"volume_id": "not-a-uuid"},
        {"volume_id": REF.volume_id.upper()},
        {"key": "x" * 65},
        {"key_version": 0},
        {"key_version": "1"},
        {"key_version": True},
        {"key_version": 2**40},
        {"url": None},
        {"secret": "AAAA"},
    ],
    ids=lambda c: ",".join(f"{k}={str(v)[:12]}" for k, v in c.items()),
)
def test_malformed_token_refused(tmp_path: Path, change: dict[str, object]) -> None:
    path = _bound(tmp_path, os.urandom(32))
    _tampered(path, change)
    with pytest.raises(VolumeRequestError) as caught:
        read_token(str(path))
    assert caught.value.code == "kms_token_invalid"


def test_token_naming_two_keyslots_or_two_tokens_refused(tmp_path: Path) -> None:
    secret = os.urandom(32)
    path = _bound(tmp_path, secret)
    add_key(str(path), secret, b"second", kdf=FAST)
    _tampered(path, {"keyslots": ["0", "1"]}, keyslots=(0, 1))
    with pytest.raises(VolumeRequestError, match="exactly one"):
        read_token(str(path))
    with Device.open(str(path)) as device:
        meta = read_header(device).v2.metadata
    token = meta.tokens[0]
    twice = replace(meta, tokens={0: token, 1: token})
    with pytest.raises(VolumeRequestError, match="2 keysteward tokens"):
        find_token(twice)
