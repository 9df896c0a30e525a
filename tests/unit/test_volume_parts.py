"""The small parts of keysteward.volume: sizes, Argon2 limits, KDF choice, key files, the device, dump."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from keysteward.errors import KeystewardError
from keysteward.formats import luks
from keysteward.volume import (
    CreateOptions,
    Device,
    KdfChoice,
    LuksVolume,
    VolumeConflict,
    VolumeNotFound,
    VolumeRequestError,
    create_volume,
    describe,
    parse_size,
    read_header,
    read_key_file,
    render,
)
from keysteward.volume import sizes as sizes_mod
from keysteward.volume.kdf import new_kdf_params, pbkdf2_iterations_for

pytestmark = pytest.mark.unit

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("64M", 64 * MIB), ("1G", 1024 * MIB), ("1g", 1024 * MIB), ("512K", 512 * 1024),
     ("2MiB", 2 * MIB), ("3 MB", 3 * MIB), ("1T", 1024**4), ("0", 0)],
)  # fmt: skip
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "12Q", "M", "1 G B", "9" * 30, "99999999999P"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(VolumeRequestError):
        parse_size(text)


def test_argon2_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    1000000 kB\n")
    assert sizes_mod.available_memory_kib(str(meminfo)) == 1000000
    assert sizes_mod.available_memory_kib(str(tmp_path / "missing")) is None
    monkeypatch.setattr(sizes_mod, "available_memory_kib", lambda: 1000000)
    assert sizes_mod.argon2_limit_kib() == 500000
    monkeypatch.setattr(sizes_mod, "available_memory_kib", lambda: 100 * 1024 * 1024)
    assert sizes_mod.argon2_limit_kib() == 4 * 1024 * 1024
    assert sizes_mod.default_argon2_memory_kib(4 * 1024 * 1024) == 1024 * 1024
    assert sizes_mod.default_argon2_memory_kib(300) == 300
    monkeypatch.setattr(sizes_mod, "available_memory_kib", lambda: None)
    assert sizes_mod.argon2_limit_kib() == 1024 * 1024
    assert sizes_mod.argon2_limit_kib(64) == 64
    with pytest.raises(VolumeRequestError):
        sizes_mod.argon2_limit_kib(4)


def test_kdf_choices() -> None:
    pbkdf2 = new_kdf_params(KdfChoice("pbkdf2", 1234), default_type="argon2id", limit_kib=1 << 20)
    assert isinstance(pbkdf2, luks.Pbkdf2Params) and pbkdf2.iterations == 1234 and pbkdf2.hash == "sha256"
    argon = new_kdf_params(KdfChoice(memory_kib=4096), default_type="argon2id", limit_kib=1 << 20)
    assert isinstance(argon, luks.Argon2Params) and argon.kind == "argon2id" and argon.memory_kib == 4096
    assert 1 <= argon.cpus <= 4 and argon.time == 4
    default = new_kdf_params(KdfChoice(), default_type="argon2id", limit_kib=2048)
    assert isinstance(default, luks.Argon2Params) and default.memory_kib == 2048, "capped to the machine's limit"
    with pytest.raises(luks.LuksFormatError) as info:
        new_kdf_params(KdfChoice("argon2id", memory_kib=4096), default_type="argon2id", limit_kib=2048)
    assert info.value.code == "luks_argon2_memory" and "4096 KiB" in info.value.message
    for bad in (KdfChoice("scrypt"), KdfChoice("pbkdf2", 0), KdfChoice("pbkdf2", parallel=2),
                KdfChoice("argon2id", memory_kib=8, parallel=4)):  # fmt: skip
        with pytest.raises(VolumeRequestError):
            new_kdf_params(bad, default_type="argon2id", limit_kib=1 << 20)
    assert pbkdf2_iterations_for(0.001) >= 1000
    timed = new_kdf_params(KdfChoice("pbkdf2", iter_time_ms=10), default_type="argon2id", limit_kib=1 << 20)
    assert isinstance(timed, luks.Pbkdf2Params) and timed.iterations >= 1000
    for bad in (KdfChoice(iter_time_ms=10), KdfChoice("pbkdf2", 1000, iter_time_ms=10),
                KdfChoice("pbkdf2", iter_time_ms=0), KdfChoice("pbkdf2", iter_time_ms=60_001)):  # fmt: skip
        with pytest.raises(VolumeRequestError, match="--iter-time"):
            new_kdf_params(bad, default_type="argon2id", limit_kib=1 << 20)


def test_key_files_are_bytes_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"pass\n\x00\r\n")
    assert read_key_file(str(path)) == bytearray(b"pass\n\x00\r\n")
    path.write_bytes(b"")
    with pytest.raises(VolumeRequestError, match="empty"):
        read_key_file(str(path))
    path.write_bytes(bytes(8 * MIB + 1))
    with pytest.raises(VolumeRequestError, match="larger"):
        read_key_file(str(path))
    with pytest.raises(VolumeNotFound):
        read_key_file(str(tmp_path / "missing"))
    with pytest.raises(VolumeRequestError, match="directory"):
        read_key_file(str(tmp_path))
    read, write = os.pipe()
    os.write(write, b"from a pipe")
    os.close(write)
    try:
        assert read_key_file("-", stdin_fd=read) == bytearray(b"from a pipe")
    finally:
        os.close(read)


def test_device(tmp_path: Path) -> None:
    path = str(tmp_path / "d")
    with Device.create_file(path, 10000) as device:
        assert device.size == 10000 and device.created and device.writable and not device.is_block
        device.pwrite(9990, b"0123456789")
        assert device.pread(9995, 5) == b"56789"
        with pytest.raises(KeystewardError, match="short"):
            device.pread(9999, 2)
        with pytest.raises(VolumeConflict, match="in use"):
            Device.open(path, writable=True)  # the write lock is exclusive
        with Device.open(path) as reader:  # readers take no lock
            assert reader.pread(0, 1) == b"\x00"
        device.fsync()
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(KeystewardError, match="File exists"):
        Device.create_file(path, 10)
    with pytest.raises(VolumeRequestError, match="not a regular file"):
        Device.open(str(tmp_path))
    with pytest.raises(VolumeNotFound):
        Device.open(str(tmp_path / "nope"))
    with Device.open(path, writable=True) as device:  # the lock went with the descriptor
        device.close()
        with pytest.raises(KeystewardError, match="closed"):
            device.pread(0, 1)


def test_dump_describes_without_secrets(tmp_path: Path) -> None:
    path = str(tmp_path / "v.img")
    create_volume(path, b"pw", CreateOptions(MIB, sector_size=512, label="dump me", kdf=KdfChoice("pbkdf2", 1000)))
    with Device.open(path) as device:
        header = read_header(device)
        info = describe(header)
    text = json.dumps(info)
    assert info["label"] == "dump me" and info["payload"] == {"offset": 16 * MIB, "size": MIB}
    assert info["keyslots"][0]["kdf"] == {"type": "pbkdf2", "hash": "sha256", "iterations": 1000}
    assert "salt" not in text and '"digest": "' not in text
    with LuksVolume.open(path, b"pw") as volume:
        key = volume.export_volume_key()
    assert key.hex() not in text and key.hex() not in render(info)
    assert "LUKS2 volume" in render(info) and "keyslot 0: pbkdf2" in render(info)
