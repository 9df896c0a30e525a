"""Real NBD clients against the proxy: qemu-img, qemu-io, nbdinfo, nbdcopy and nbdfuse, over TCP with TLS
(client certificates from the tenant CA) and in plaintext on loopback. What a client writes through the
proxy reads back through ``keysteward volume read`` (and the other way round): the proxy serves the
volume's real payload, encrypted on disk."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keysteward.proxy.export import LuksExport
from tests.support.nbd import MIB, PASSPHRASE, Pki, ServerThread, make_pki, make_volume, server_context
from tests.support.tools import tool

pytestmark = pytest.mark.integration

SIZE = 32 * MIB


def _ks() -> str:
    import sys

    return str(Path(sys.executable).with_name("keysteward"))


def run(argv: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}{done.stdout}")
    return done


def volume_read(image: Path, pw: Path, offset: int, length: int) -> bytes:
    argv = [_ks(), "volume", "read", str(image), "--passphrase-file", str(pw), "--offset", str(offset),
            "--length", str(length)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout


def volume_write(image: Path, pw: Path, offset: int, data_file: Path) -> None:
    argv = [_ks(), "volume", "write", str(image), "--passphrase-file", str(pw), "--offset", str(offset),
            "--input", str(data_file)]  # fmt: skip
    subprocess.run(argv, capture_output=True, check=True, timeout=60)


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.image = make_volume(tmp / "vol.img", SIZE)
        self.spare = make_volume(tmp / "spare.img", 4 * MIB, sector=512)
        self.pw = tmp / "pw"
        self.pw.write_bytes(PASSPHRASE)
        self.pki: Pki = make_pki(tmp / "pki")

    def exports(self) -> dict[str, LuksExport]:
        return {
            "vol": LuksExport.open("vol", str(self.image), PASSPHRASE, description="tenant disk"),
            "spare": LuksExport.open("spare", str(self.spare), PASSPHRASE, read_only=True),
        }

    def tls_uri(self, port: int, name: str = "vol") -> str:
        return f"nbds://localhost:{port}/{name}?tls-certificates={self.pki.client_dir}"

    def qemu_tls(self, port: int, name: str = "vol") -> list[str]:
        """qemu-img / qemu-io arguments for the export over TLS (image-opts, the x509 credentials object)."""
        return ["--object", f"tls-creds-x509,id=tls0,dir={self.pki.client_dir},endpoint=client", "--image-opts",
                f"driver=nbd,host=localhost,port={port},export={name},tls-creds=tls0"]  # fmt: skip


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


@pytest.fixture
def tls_server(setup: Setup) -> Iterator[ServerThread]:
    with ServerThread(setup.exports(), tls=server_context(setup.pki)) as server:
        yield server


@pytest.fixture
def plain_server(setup: Setup) -> Iterator[ServerThread]:
    with ServerThread(setup.exports(), unix_path=str(setup.tmp / "nbd.sock")) as server:
        yield server


def test_nbdinfo_lists_exports_and_capabilities_over_tls(setup: Setup, tls_server: ServerThread) -> None:
    nbdinfo = tool("nbdinfo", "libnbd-bin")
    listed = run([nbdinfo, "--list", "--json", setup.tls_uri(tls_server.port, "")]).stdout
    assert '"export-name": "vol"' in listed and '"export-name": "spare"' in listed
    assert '"description": "tenant disk"' in listed
    info = run([nbdinfo, setup.tls_uri(tls_server.port)]).stdout
    assert "with TLS" in info and "export-size: 33554432" in info
    assert "block_size_minimum: 1" in info and "block_size_preferred: 4096" in info  # any alignment is served
    uri = setup.tls_uri(tls_server.port)
    for can in ("connect", "read", "write", "flush", "trim", "zero", "fua", "multi-conn"):
        assert run([nbdinfo, "--can", can, uri], check=False).returncode == 0, can
    assert run([nbdinfo, "--can", "cache", uri], check=False).returncode == 2
    spare = setup.tls_uri(tls_server.port, "spare")
    assert run([nbdinfo, "--is", "read-only", spare], check=False).returncode == 0
    assert run([nbdinfo, "--can", "write", spare], check=False).returncode == 2
    assert "block_size_preferred: 4096" in run([nbdinfo, spare]).stdout
    # without a client certificate from the tenant CA, no connection
    bare = setup.tmp / "bare"
    bare.mkdir()
    (bare / "ca-cert.pem").write_bytes(setup.pki.ca_cert.read_bytes())
    refused = run([nbdinfo, f"nbds://localhost:{tls_server.port}/vol?tls-certificates={bare}"], check=False)
    assert refused.returncode != 0
    # and a plaintext client gets nothing (the exact NBD_REP_ERR_TLS_REQD is checked in test_nbd_faults)
    plain = run([nbdinfo, f"nbd://127.0.0.1:{tls_server.port}/vol"], check=False)
    assert plain.returncode != 0 and "export-size" not in plain.stdout


def test_qemu_img_convert_compare_info_over_tls_reads_back_through_keysteward(
    setup: Setup, tls_server: ServerThread
) -> None:
    qemu_img = tool("qemu-img", "qemu-utils")
    src = setup.tmp / "src.bin"
    data = random.Random(1).randbytes(SIZE)
    src.write_bytes(data)
    tls = setup.qemu_tls(tls_server.port)
    info = run([qemu_img, "info", *tls]).stdout
    assert "virtual size: 32 MiB" in info
    run([qemu_img, "convert", "-n", "-f", "raw", *tls[:2], "--target-image-opts", str(src), tls[-1]])
    assert "Images are identical" in run([qemu_img, "compare", *tls[:2], "--image-opts",
                                          f"driver=raw,file.filename={src}", tls[-1]]).stdout  # fmt: skip
    data2 = bytearray(data)
    data2[5 * MIB] ^= 1
    src.write_bytes(data2)
    differ = run([qemu_img, "compare", *tls[:2], "--image-opts", f"driver=raw,file.filename={src}", tls[-1]],
                 check=False)  # fmt: skip
    assert differ.returncode == 1 and "Content mismatch at offset 5242880" in differ.stdout
    tls_server.call(tls_server.server.stop)  # flushes and closes the volume before the CLI opens it
    assert volume_read(setup.image, setup.pw, 0, SIZE) == data


def test_qemu_io_patterns_plaintext_and_tls(setup: Setup) -> None:
    qemu_io = tool("qemu-io", "qemu-utils")
    commands = [
        "write -P 0xab 1M 64k", "read -P 0xab 1M 64k",
        "write -z 2M 128k", "read -P 0 2M 128k",
        "write -P 0xcd 12345 777", "read -P 0xcd 12345 777",  # unaligned: read-modify-write of two sectors
        "read -P 0xab 1M 64k", "flush",
        # concurrent writes in flight together (NBD does not order overlapping ones, so these do not overlap)
        "aio_write -P 0x11 4M 4k", "aio_write -P 0x22 5M 4k", "aio_flush", "read -P 0x11 4M 4k", "read -P 0x22 5M 4k",
    ]  # fmt: skip
    argv = [arg for cmd in commands for arg in ("-c", cmd)]
    with ServerThread(setup.exports()) as plain:
        out = run([qemu_io, "-f", "raw", *argv, f"nbd://127.0.0.1:{plain.port}/vol"]).stdout
        assert "Pattern verification failed" not in out and out.count("read ") >= 4
    with ServerThread(setup.exports(), tls=server_context(setup.pki)) as tls:
        out = run([qemu_io, *setup.qemu_tls(tls.port), "-c", "read -P 0xcd 12345 777", "-c", "write -P 0x5a 8M 1M",
                   "-c", "read -P 0x5a 8M 1M"]).stdout  # fmt: skip
        assert "Pattern verification failed" not in out
        bad = run([qemu_io, *setup.qemu_tls(tls.port), "-c", "read -P 0x00 8M 4k"], check=False).stdout
        assert "Pattern verification failed" in bad  # the check can fail
    assert volume_read(setup.image, setup.pw, MIB, 64 * 1024) == b"\xab" * 65536
    assert volume_read(setup.image, setup.pw, 12345, 777) == b"\xcd" * 777
    assert volume_read(setup.image, setup.pw, 12344, 1) != b"\xcd"
    assert volume_read(setup.image, setup.pw, 2 * MIB, 128 * 1024) == bytes(128 * 1024)
    assert volume_read(setup.image, setup.pw, 8 * MIB, MIB) == b"\x5a" * MIB


def test_nbdcopy_both_directions_over_tls(setup: Setup) -> None:
    nbdcopy = tool("nbdcopy", "libnbd-bin")
    before = random.Random(2).randbytes(SIZE)
    (setup.tmp / "before.bin").write_bytes(before)
    volume_write(setup.image, setup.pw, 0, setup.tmp / "before.bin")  # written by keysteward, read by nbdcopy
    with ServerThread(setup.exports(), tls=server_context(setup.pki)) as server:
        uri = setup.tls_uri(server.port)
        run([nbdcopy, uri, str(setup.tmp / "out.bin")])
        assert (setup.tmp / "out.bin").read_bytes() == before
        after = random.Random(3).randbytes(SIZE)
        (setup.tmp / "after.bin").write_bytes(after)
        run([nbdcopy, str(setup.tmp / "after.bin"), uri])  # four connections, many requests in flight
        run([nbdcopy, uri, str(setup.tmp / "again.bin")])
        assert (setup.tmp / "again.bin").read_bytes() == after
    assert volume_read(setup.image, setup.pw, 0, SIZE) == after
    assert after not in setup.image.read_bytes()[: 4 * MIB + SIZE]  # on disk: ciphertext only


def test_nbdfuse_mkfs_ext4_and_debugfs(setup: Setup, plain_server: ServerThread) -> None:
    nbdfuse = tool("nbdfuse", "nbdfuse")
    mkfs, debugfs = tool("mkfs.ext4", "e2fsprogs"), tool("debugfs", "e2fsprogs")
    fusermount = tool("fusermount3", "fuse3")
    mnt = setup.tmp / "mnt"
    mnt.mkdir()
    uri = f"nbd+unix:///vol?socket={setup.tmp / 'nbd.sock'}"
    fuse = subprocess.Popen([nbdfuse, str(mnt / "disk"), uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "disk").exists():
            assert fuse.poll() is None, fuse.stderr.read() if fuse.stderr else b""
            assert time.monotonic() < deadline, "nbdfuse did not mount"
            time.sleep(0.1)
        run([mkfs, "-F", "-q", "-L", "proxied", str(mnt / "disk")])
        (setup.tmp / "hello.txt").write_text("written through the proxy\n")
        run([debugfs, "-w", "-R", f"write {setup.tmp / 'hello.txt'} hello.txt", str(mnt / "disk")])
        assert "written through the proxy" in run([debugfs, "-R", "cat hello.txt", str(mnt / "disk")]).stdout
    finally:
        subprocess.run([fusermount, "-u", str(mnt)], capture_output=True, check=False, timeout=30)
        try:
            fuse.wait(30)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait(10)
    plain_server.call(plain_server.server.stop)
    payload = setup.tmp / "payload.ext4"
    payload.write_bytes(volume_read(setup.image, setup.pw, 0, SIZE))
    assert "written through the proxy" in run([debugfs, "-R", "cat hello.txt", str(payload)]).stdout
    assert "proxied" in run([tool("dumpe2fs", "e2fsprogs"), "-h", str(payload)]).stdout
