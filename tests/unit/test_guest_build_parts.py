"""The guest build's parsers on bad input: module dependencies, the pinned kernel package, the bzImage."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest

from keysteward.devcloud.guest import (
    GuestBuildError,
    _kernel_package,
    _modinfo_depends,
    _module_order,
    _uncompressed_kernel,
)

pytestmark = pytest.mark.unit


def _ko(root: Path, name: str, modinfo: bytes) -> None:
    path = root / "drivers" / f"{name}.ko"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF junk\0license=GPL\0" + modinfo + b"\0vermagic=6.1\0")


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    _ko(tmp_path, "virtio_ring", b"depends=")
    _ko(tmp_path, "virtio", b"depends=virtio_ring")
    _ko(tmp_path, "virtio-pci", b"depends=virtio_ring,virtio")
    _ko(tmp_path, "virtio_blk", b"depends=virtio,virtio_ring")
    order = [p.name for p in _module_order(tmp_path, ("virtio_pci", "virtio_blk"))]
    assert order == ["virtio_ring.ko", "virtio.ko", "virtio-pci.ko", "virtio_blk.ko"]


@pytest.mark.parametrize(
    "modinfo",
    [b"", b"depends", b"depends=\xff\xfe", b"depends=a;rm -rf /", b"xdepends=virtio", b"depends=" + b"a" * 10],
)
def test_malformed_depends_means_none(tmp_path: Path, modinfo: bytes) -> None:
    _ko(tmp_path, "m", modinfo)
    depends = _modinfo_depends(tmp_path / "drivers" / "m.ko")
    assert depends in ([], ["a" * 10])


def test_missing_dependency_and_cycle(tmp_path: Path) -> None:
    _ko(tmp_path, "blk", b"depends=absent")
    with pytest.raises(GuestBuildError, match="absent not found"):
        _module_order(tmp_path, ("blk",))
    _ko(tmp_path, "a", b"depends=b")
    _ko(tmp_path, "b", b"depends=a")
    assert sorted(p.name for p in _module_order(tmp_path, ("a",))) == ["a.ko", "b.ko"]  # ends, no recursion


@pytest.mark.parametrize("pinned", ['{"package": "linux-image-x; rm -rf /"}', '{"package": 7}', '{"package": ""}'])
def test_bad_pinned_kernel_package_refused(tmp_path: Path, pinned: str) -> None:
    (tmp_path / "kernel.json").write_text(pinned)
    with pytest.raises(GuestBuildError):
        _kernel_package(tmp_path)


def test_pinned_kernel_package_read_without_apt(tmp_path: Path) -> None:
    (tmp_path / "kernel.json").write_text(json.dumps({"package": "linux-image-6.1.0-57-amd64"}))
    assert _kernel_package(tmp_path) == "linux-image-6.1.0-57-amd64"


@pytest.mark.parametrize(
    "bzimage",
    [
        b"MZ no xz here",
        b"MZ\xfd7zXZ\x00 truncated stream",
        b"MZ" + lzma.compress(b"not an ELF", format=lzma.FORMAT_XZ),
        b"MZ" + lzma.compress(b"\x7fELF without the PVH note", format=lzma.FORMAT_XZ),
    ],
)
def test_kernel_that_cannot_boot_by_pvh_stays_a_bzimage(tmp_path: Path, bzimage: bytes) -> None:
    (tmp_path / "vmlinuz").write_bytes(bzimage)
    assert _uncompressed_kernel(tmp_path) == tmp_path / "vmlinuz"
    assert not (tmp_path / "vmlinux").exists()


def test_kernel_with_pvh_note_is_unpacked_once(tmp_path: Path) -> None:
    elf = b"\x7fELF" + b"\0" * 64 + b"Xen\x00" + b"\x01" * 64
    (tmp_path / "vmlinuz").write_bytes(b"MZ setup" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"trailer")
    assert _uncompressed_kernel(tmp_path) == tmp_path / "vmlinux"
    assert (tmp_path / "vmlinux").read_bytes() == elf
    (tmp_path / "vmlinuz").unlink()
    assert _uncompressed_kernel(tmp_path) == tmp_path / "vmlinux"  # cached: the bzImage is not read again
