"""The agent's device-mapper hand-off, for real: the secret goes to cryptsetup on a pipe, no key file.

There is no device-mapper on these machines, so the hand-off function runs ``cryptsetup open
--test-passphrase --key-file=- --key-slot N`` (the same argv as the real open, minus the mapping);
the real ``open`` is shown to reach device-mapper and fail there cleanly, never silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keysteward.agent.unlock import cryptsetup_open, dm_available, feed_stdin
from keysteward.crypto.secret import SecretBuffer
from keysteward.errors import KeystewardError
from keysteward.formats import luks
from keysteward.volume.create import CreateOptions, create_volume
from keysteward.volume.keyslots import add_key
from keysteward.volume.kms_token import KEYSLOT_KDF, KmsRef, attach_token
from tests.integration.test_volume_tools import MIB, tool

pytestmark = pytest.mark.integration

REF = KmsRef("https://kms.example:8443", "acme", "0b7a4a53-54c4-4fb0-8d0e-5b8f7c1e2a11", "volumes", 1)


@pytest.fixture(scope="module")
def cryptsetup() -> str:
    return tool("cryptsetup", "cryptsetup-bin")


@pytest.fixture
def bound(tmp_path: Path) -> tuple[Path, bytes]:
    secret = os.urandom(32)
    # a newline inside the key proves the pipe is read as raw bytes; no NUL at its end, where PBKDF2 cannot
    # tell it from the key one byte shorter (HMAC pads a key to its block with zeros: the same HMAC key)
    while b"\n" not in secret or secret.endswith(b"\0"):
        secret = os.urandom(32)
    path = tmp_path / "v.img"
    create_volume(str(path), bytearray(secret), CreateOptions(size=4 * MIB, kdf=KEYSLOT_KDF))
    attach_token(str(path), REF, 0)
    add_key(str(path), secret, b"other passphrase", kdf=KEYSLOT_KDF)  # slot 1: --key-slot must matter
    return path, secret


def test_secret_on_stdin_opens_the_keyslot(bound: tuple[Path, bytes], cryptsetup: str) -> None:
    path, secret = bound
    with SecretBuffer.from_bytes(secret) as buf:
        cryptsetup_open(str(path), None, 0, buf, test=True, cryptsetup=cryptsetup)


def test_wrong_secret_or_wrong_slot_is_refused(bound: tuple[Path, bytes], cryptsetup: str) -> None:
    path, secret = bound
    with SecretBuffer.from_bytes(os.urandom(32)) as wrong, pytest.raises(luks.LuksWrongPassphrase):
        cryptsetup_open(str(path), None, 0, wrong, test=True, cryptsetup=cryptsetup)
    with SecretBuffer.from_bytes(secret) as buf, pytest.raises(luks.LuksWrongPassphrase):
        cryptsetup_open(str(path), None, 1, buf, test=True, cryptsetup=cryptsetup)  # right key, other slot
    with SecretBuffer.from_bytes(secret[:-1]) as short, pytest.raises(luks.LuksWrongPassphrase):
        cryptsetup_open(str(path), None, 0, short, test=True, cryptsetup=cryptsetup)  # every byte counts


def test_feed_stdin_passes_bytes_exactly(tmp_path: Path) -> None:
    data = bytes(range(256)) * 300  # more than a pipe buffer, every byte value
    out = tmp_path / "copy"
    done = feed_stdin(["sh", "-c", f"cat > {out}"], memoryview(data))
    assert done.returncode == 0 and out.read_bytes() == data
    early = feed_stdin(["true"], memoryview(data))  # a reader that leaves early is not an error of the feeder
    assert early.returncode == 0


def test_real_open_reaches_device_mapper(bound: tuple[Path, bytes], cryptsetup: str) -> None:
    path, secret = bound
    assert dm_available() is False  # this machine has a control node but no device-mapper in its kernel
    assert not os.path.exists("/dev/mapper/ks-test")
    with SecretBuffer.from_bytes(secret) as buf, pytest.raises(KeystewardError) as caught:
        cryptsetup_open(str(path), "ks-test", 0, buf, cryptsetup=cryptsetup)
    assert caught.value.code == "cryptsetup_failed"
    assert "ks-test" in caught.value.message  # the key was accepted; creating the mapping is what failed
