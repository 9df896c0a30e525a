"""``keysteward volume`` against QEMU 7.2's LUKS1 driver (QEMU speaks LUKS1 only), both ways.

- an image QEMU formats and ``qemu-io`` writes reads back through ``keysteward volume read``;
- an image ``keysteward volume create --luks1`` makes and ``keysteward volume write`` fills converts
  to the right raw bytes with ``qemu-img convert``, and ``qemu-io`` verifies patterns written by
  keysteward, while keysteward reads what ``qemu-io`` wrote into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_volume_tools import MIB, keyfile, ks, pattern, run, tool
from tests.support.tools import qemu_img_create

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def qemu() -> tuple[str, str]:
    return tool("qemu-img", "qemu-utils"), tool("qemu-io", "qemu-utils")


def _opts(image: Path) -> list[str]:
    return ["--image-opts", f"driver=luks,key-secret=s0,file.filename={image}"]


def _secret(pw: Path) -> list[str]:
    return ["--object", f"secret,id=s0,file={pw}"]


def test_qemu_written_image_reads_back(qemu: tuple[str, str], tmp_path: Path) -> None:
    qemu_img, qemu_io = qemu
    image, pw = tmp_path / "q.luks", keyfile(tmp_path / "pw", b"qemu secret")
    argv = [qemu_img, "create", "-q", "-f", "luks", *_secret(pw), "-o", "key-secret=s0,iter-time=50", str(image), "8M"]
    qemu_img_create(argv)
    run([qemu_io, *_secret(pw), *_opts(image), "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 1M 512",
         "-c", "write -P 0x5a 7M 4096", "-c", "write -P 0x11 3000 100"])  # fmt: skip

    info = json.loads(ks("dump", image, "--json").stdout)
    assert info["version"] == 1 and info["encryption"] == "aes-xts-plain64" and info["payload"]["size"] == 8 * MIB
    out = ks("read", image, "--passphrase-file", pw).stdout
    for offset, length, byte in [(0, 3000, 0xAB), (3000, 100, 0x11), (3100, MIB - 3100, 0xAB), (MIB, 512, 0xCD),
                                 (7 * MIB, 4096, 0x5A)]:  # fmt: skip
        assert out[offset : offset + length] == bytes([byte]) * length, hex(offset)
    # unwritten sectors decrypt to noise: the same noise QEMU itself decrypts them to
    raw = tmp_path / "qemu.raw"
    run([qemu_img, "convert", *_secret(pw), *_opts(image), "-O", "raw", str(raw)])
    assert out == raw.read_bytes()
    assert ks("read", image, "--passphrase-file", pw, "--offset", 2990, "--length", 120).stdout == out[2990:3110]


def test_keysteward_image_converts_with_qemu_img(qemu: tuple[str, str], tmp_path: Path) -> None:
    qemu_img, qemu_io = qemu
    image, pw = tmp_path / "k.luks", keyfile(tmp_path / "pw", b"from keysteward\n")
    made = json.loads(ks("create", image, "--size", "6M", "--luks1", "--sector-size", "512", "--passphrase-file", pw,
                         "--pbkdf-iterations", "1000", "--json").stdout)  # fmt: skip
    assert made["version"] == 1 and made["kdf"]["type"] == "pbkdf2"
    content = bytearray(ks("read", image, "--passphrase-file", pw).stdout)
    assert len(content) == 6 * MIB
    for offset, data in [(0, pattern(2 * MIB + 3, 7)), (4 * MIB - 1, pattern(5000, 8)), (6 * MIB - 512, b"\x42" * 512)]:
        ks("write", image, "--passphrase-file", pw, "--offset", offset, input=data)
        content[offset : offset + len(data)] = data

    raw = tmp_path / "out.raw"
    run([qemu_img, "convert", *_secret(pw), *_opts(image), "-O", "raw", str(raw)])
    assert raw.read_bytes() == bytes(content)
    run([qemu_io, *_secret(pw), *_opts(image), "-c", f"read -P 0x42 {6 * MIB - 512} 512"])

    # QEMU writes into the keysteward image; keysteward reads it; a second keyslot works for QEMU too
    run([qemu_io, *_secret(pw), *_opts(image), "-c", "write -P 0x77 1M 4096"])
    content[MIB : MIB + 4096] = b"\x77" * 4096
    assert ks("read", image, "--passphrase-file", pw).stdout == bytes(content)
    other = keyfile(tmp_path / "other", b"second")
    added = json.loads(ks("add-key", image, "--passphrase-file", pw, "--new-passphrase-file", other,
                          "--pbkdf-iterations", "1000", "--json").stdout)  # fmt: skip
    assert added["keyslot"] == 1
    run([qemu_img, "convert", *_secret(other), *_opts(image), "-O", "raw", str(raw)])
    assert raw.read_bytes() == bytes(content)
    ks("remove-key", image, "--slot", 0, "--passphrase-file", other)
    failed = run([qemu_img, "convert", *_secret(pw), *_opts(image), "-O", "raw", str(raw)], check=False)
    assert failed.returncode != 0, "the removed passphrase no longer opens the image"
