"""A small Linux guest for the hypervisor tests, demo and bench: Debian's kernel and a busybox initramfs.

``build_guest(cache_dir)`` returns the kernel and the initramfs QEMU boots with ``-kernel``/``-initrd``.
The kernel is the one ``linux-image-amd64`` depends on, fetched with ``apt-get download`` (never
installed on the host) and unpacked with ``dpkg-deb -x``; only ``vmlinuz`` and the virtio modules a
virtio-blk disk needs are kept, and the ELF ``vmlinux`` inside ``vmlinuz`` is what QEMU boots (its
PVH entry skips the slow in-guest decompression under TCG: first kernel line after ~0.7 s, not ~4.7 s).
The initramfs is written here: ``/bin/busybox`` (busybox-static), those modules, ``/dev/console``
and the ``/init`` of :mod:`keysteward.devcloud.guest_init`.

Cache layout under ``cache_dir`` (built under an exclusive ``flock``, each directory renamed into
place whole): ``kernel.json`` names the kernel package chosen at the first build (delete it to
follow a newer ``linux-image-amd64``), ``kernel-<release>/`` holds vmlinuz, vmlinux and modules, and
``guest-<release>-<hash of /init>/initrd.gz`` the initramfs. A second call reads two small files.

    python -m keysteward.devcloud.guest --cache DIR   # prints {"kernel": ..., "initrd": ...}
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from keysteward.devcloud.cpio import CpioWriter
from keysteward.devcloud.guest_init import init_script
from keysteward.errors import KeystewardError

META_PACKAGE: Final = "linux-image-amd64"
BUSYBOX: Final = Path("/bin/busybox")
#: what a virtio-blk disk on a PCI bus needs when these are modules (=m in Debian's config)
ROOT_MODULES: Final = ("virtio_pci", "virtio_blk")
TOOL_TIMEOUT: Final = 600.0
XZ_MAGIC: Final = b"\xfd7zXZ\x00"
#: the ELF note owner of the PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY) QEMU needs to boot an ELF kernel
PVH_NOTE_NAME: Final = b"Xen\x00"
_PACKAGE_RE: Final = re.compile(r"^linux-image-[0-9][A-Za-z0-9.+~-]*$")


class GuestBuildError(KeystewardError):
    code = "guest_build_failed"
    status = 500
    title = "Guest build failed"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestBuildError(f"{argv[0]} failed: {exc}") from None
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return done.stdout


def _kernel_package(cache_dir: Path) -> str:
    """The concrete kernel package, pinned in ``kernel.json`` at the first build."""
    pin = cache_dir / "kernel.json"
    if pin.exists():
        name = json.loads(pin.read_text()).get("package", "")
    else:
        shown = _run(["apt-cache", "show", "--no-all-versions", META_PACKAGE])
        found = re.search(r"^Depends:.*?\b(linux-image-[^\s,(]+)", shown, re.MULTILINE)
        name = found.group(1) if found else ""
    if not isinstance(name, str) or not _PACKAGE_RE.match(name):
        raise GuestBuildError(f"cannot tell which kernel package {META_PACKAGE} depends on")
    if not pin.exists():
        pin.write_text(json.dumps({"package": name}) + "\n")
    return name


def _modinfo_depends(module: Path) -> list[str]:
    """The ``depends=`` field of a .ko's .modinfo section (no modules.dep: depmod never ran)."""
    found = re.search(rb"\0depends=([A-Za-z0-9_,-]*)\0", module.read_bytes())
    return [d.replace("-", "_") for d in found.group(1).decode().split(",") if d] if found else []


def _module_order(modules_root: Path, roots: tuple[str, ...]) -> list[Path]:
    """The .ko files ``roots`` need, each after the modules it depends on."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in modules_root.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, depth: int) -> None:
        if name in seen:
            return
        if depth > 16 or name not in index:
            raise GuestBuildError(f"kernel module {name} not found (is it built in?)")
        seen.add(name)
        for dependency in _modinfo_depends(index[name]):
            visit(dependency, depth + 1)
        order.append(index[name])

    for root in roots:
        visit(root, 0)
    return order


def _fetch_kernel(cache_dir: Path, package: str) -> Path:
    """``kernel-<release>/`` with ``vmlinuz`` and ``modules/*.ko`` plus ``modules.order``."""
    for existing in cache_dir.glob("kernel-*/modules.order"):
        if json.loads((existing.parent / "package.json").read_text()).get("package") == package:
            return existing.parent
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", package], cwd=work)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise GuestBuildError(f"apt-get download {package} left {len(debs)} packages")
        _run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")])
        releases = sorted((work / "root" / "lib" / "modules").iterdir())
        if len(releases) != 1:
            raise GuestBuildError(f"{package} holds {len(releases)} module trees")
        release = releases[0].name
        kernels = sorted((work / "root" / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise GuestBuildError(f"{package} holds {len(kernels)} kernels")
        out = work / "out"
        (out / "modules").mkdir(parents=True)
        shutil.copyfile(kernels[0], out / "vmlinuz")
        order = _module_order(releases[0] / "kernel", ROOT_MODULES)
        for module in order:
            shutil.copyfile(module, out / "modules" / module.name)
        (out / "package.json").write_text(json.dumps({"package": package, "release": release}) + "\n")
        (out / "modules.order").write_text("".join(m.name.removesuffix(".ko") + "\n" for m in order))
        final = cache_dir / f"kernel-{release}"
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
        return final


def _uncompressed_kernel(kernel_dir: Path) -> Path:
    """``vmlinux``, the ELF inside Debian's xz bzImage, which QEMU boots directly (PVH entry).

    Under TCG the guest's own decompression of the bzImage costs seconds before the kernel's
    first line; this does it once, here. A bzImage that is not xz is booted as it is.
    """
    vmlinux = kernel_dir / "vmlinux"
    if vmlinux.exists():
        return vmlinux
    bzimage = (kernel_dir / "vmlinuz").read_bytes()
    start = bzimage.find(XZ_MAGIC)
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:]) if start >= 0 else b""
    except lzma.LZMAError:
        elf = b""
    if not elf.startswith(b"\x7fELF") or PVH_NOTE_NAME not in elf:
        return kernel_dir / "vmlinuz"
    tmp = vmlinux.with_name("vmlinux.tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, vmlinux)
    return vmlinux


def _write_initrd(path: Path, kernel_dir: Path, modules: list[str], init: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as out:
        cpio = CpioWriter(out)  # type: ignore[arg-type]
        for directory in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"):
            cpio.directory(directory)
        cpio.char_device("dev/console", 5, 1)
        cpio.char_device("dev/null", 1, 3, perm=0o666)
        cpio.file("bin/busybox", BUSYBOX.read_bytes(), perm=0o755)
        for name in modules:
            cpio.file(f"lib/modules/{name}.ko", (kernel_dir / "modules" / f"{name}.ko").read_bytes())
        cpio.file("init", init.encode(), perm=0o755)
        cpio.close()
    os.replace(tmp, path)


def build_guest(cache_dir: Path) -> GuestImage:
    """The guest's kernel and initramfs, built into ``cache_dir`` at the first call, reused after."""
    cache_dir = Path(cache_dir).resolve()
    with _locked(cache_dir):
        kernel_dir = _fetch_kernel(cache_dir, _kernel_package(cache_dir))
        modules = (kernel_dir / "modules.order").read_text().split()
        init = init_script(modules)
        digest = hashlib.sha256(init.encode() + BUSYBOX.read_bytes()).hexdigest()[:16]
        guest_dir = cache_dir / f"guest-{kernel_dir.name.removeprefix('kernel-')}-{digest}"
        initrd = guest_dir / "initrd.gz"
        if not initrd.exists():
            guest_dir.mkdir(exist_ok=True)
            _write_initrd(initrd, kernel_dir, modules, init)
        return GuestImage(kernel=_uncompressed_kernel(kernel_dir), initrd=initrd)


def guest_append(*, marker: bytes | None = None, fill_mb: int = 0) -> str:
    """The kernel command line for this guest: serial console, quiet, reboot on panic, the ks.* parameters."""
    if not 0 <= fill_mb <= 1 << 20:
        raise ValueError("fill_mb out of range")
    parts = ["console=ttyS0", "quiet", "panic=-1"]
    if marker:
        parts.append(f"ks.marker={marker.hex()}")
    if fill_mb:
        parts.append(f"ks.fill_mb={fill_mb}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keysteward.devcloud.guest", description=__doc__)
    parser.add_argument("--cache", type=Path, required=True, help="cache directory (created if missing)")
    args = parser.parse_args(argv)
    try:
        image = build_guest(args.cache)
    except KeystewardError as exc:
        print(exc.diagnostics())
        return 1
    print(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
