"""The test guest under real QEMU (TCG): boot, the disk counter, and the VM's state through a pipe.

What the hypervisor work builds on: the guest boots and ticks; its disk counter survives a reboot;
its state saved through ``migrate fd:`` into memory and loaded into a new QEMU (``-incoming defer``)
brings back the same RAM (the marker's md5) and a counter that goes on instead of restarting; and,
the positive control for the encrypted snapshots to come, that plaintext state holds the marker.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keysteward.devcloud.guest import GuestImage, build_guest, guest_append
from keysteward.devcloud.guest_init import COUNTER_MAGIC, MARKER_BYTES
from keysteward.host.qemu import FileDisk, QemuError, QemuVm, VmLaunch, probe_accel
from keysteward.host.qmp import QmpCommandError
from tests.fixtures.guest import guest_cache_dir

pytestmark = pytest.mark.integration

TICK = re.compile(r"^ks-guest tick=(\d+) counter=(\d+) ram=(\S+)$", re.MULTILINE)
BOOT_SECONDS = 60.0


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    return path


@pytest.fixture
def vms() -> Iterator[list[QemuVm]]:
    started: list[QemuVm] = []
    yield started
    for vm in started:
        vm.stop(timeout=2.0)


def _launch(guest: GuestImage, tmp: Path, tag: str, disk: Path, append: str, **extra: object) -> VmLaunch:
    return VmLaunch(name=f"guest-{tag}", kernel=guest.kernel, initrd=guest.initrd, append=append,
                    disks=(FileDisk(disk),), serial_log=tmp / f"{tag}.log", qmp_socket=tmp / f"{tag}.qmp",
                    **extra)  # type: ignore[arg-type]  # fmt: skip


def _start(vms: list[QemuVm], launch: VmLaunch) -> QemuVm:
    vm = QemuVm(launch)
    vms.append(vm)
    vm.start()
    return vm


def _ticks(vm: QemuVm, count: int, start: int = 0) -> list[tuple[int, int, str]]:
    """The next ``count`` tick lines at or after ``start``."""
    found: list[tuple[int, int, str]] = []
    while len(found) < count:
        match = vm.wait_serial(TICK, BOOT_SECONDS, start=start)
        found.append((int(match[1]), int(match[2]), match[3]))
        start = match.end()
    return found


def test_guest_build_is_cached(guest_image: GuestImage, tmp_path: Path) -> None:
    began = time.monotonic()
    again = build_guest(guest_cache_dir())
    assert again == guest_image and time.monotonic() - began < 1.0
    with again.kernel.open("rb") as kernel:
        assert kernel.read(4) == b"\x7fELF", "QEMU boots the uncompressed kernel (PVH), not the bzImage"
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(again.initrd.read_bytes()),
                             capture_output=True, check=True).stdout.decode().split()  # fmt: skip
    for name in ("init", "bin/busybox", "dev/console", "lib/modules/virtio_blk.ko", "lib/modules/virtio_pci.ko"):
        assert name in listing


def test_probe_accel_answers_in_bounded_time_and_once(guest_image: GuestImage) -> None:
    began = time.monotonic()
    accel = probe_accel(guest_image.kernel, guest_image.initrd, timeout=3.0)
    assert accel in ("kvm", "tcg") and time.monotonic() - began < 15.0
    began = time.monotonic()
    assert probe_accel(guest_image.kernel, guest_image.initrd) == accel and time.monotonic() - began < 0.01


def test_guest_ticks_and_counter_survives_reboot(
    guest_image: GuestImage, tmp_path: Path, disk: Path, vms: list[QemuVm]
) -> None:
    vm = _start(vms, _launch(guest_image, tmp_path, "boot", disk, guest_append()))
    began = time.monotonic()
    first = vm.wait_serial(r"^ks-guest \S.*$", BOOT_SECONDS)
    assert first[0] == "ks-guest ready", "the first line the guest prints is its ready line"
    print(f"first serial line after {time.monotonic() - began:.2f} s under TCG")
    ticks = _ticks(vm, 3)
    assert [t[:2] for t in ticks] == [(1, 1), (2, 2), (3, 3)] and {t[2] for t in ticks} == {"-"}
    with pytest.raises(QmpCommandError) as raised:
        vm.monitor().execute("no-such-command")
    assert raised.value.error_class == "CommandNotFound"

    mark = len(vm.serial_text())
    vm.monitor().execute("system_reset")
    reboot = vm.wait_serial(r"^ks-guest ready$", BOOT_SECONDS, start=mark)
    tick, counter, _ = _ticks(vm, 1, reboot.end())[0]
    assert tick == 1 and counter > 3, "the counter lives on the disk, the tick in RAM"
    vm.stop()
    assert vm.process is not None and vm.process.returncode is not None
    sector = disk.read_bytes()[:512]
    assert sector.startswith(f"{COUNTER_MAGIC} ".encode()) and int(sector.split()[1]) >= counter


def _drain(fd: int, into: bytearray) -> threading.Thread:
    def run() -> None:
        while chunk := os.read(fd, 1 << 20):
            into.extend(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _feed(fd: int, data: bytes) -> threading.Thread:
    def run() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[: 1 << 20]) :]
        except BrokenPipeError:
            pass
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_state_through_a_pipe_restores_ram_and_counter(
    guest_image: GuestImage, tmp_path: Path, disk: Path, vms: list[QemuVm]
) -> None:
    marker = os.urandom(32)
    expected_md5 = hashlib.md5((marker * (MARKER_BYTES // 32))[:MARKER_BYTES]).hexdigest()  # noqa: S324
    append = guest_append(marker=marker, fill_mb=8)
    source = _start(vms, _launch(guest_image, tmp_path, "source", disk, append))
    source.wait_serial(r"^ks-guest filled mb=8$", BOOT_SECONDS)
    before = _ticks(source, 2)
    assert before[-1][2] == expected_md5, "the guest holds the marker in RAM"

    read_end, write_end = os.pipe()
    state = bytearray()
    reader = _drain(read_end, state)
    stats = source.save_state_to_fd(write_end)
    os.close(write_end)
    reader.join(30)
    os.close(read_end)
    assert stats.status == "completed" and stats.transferred_bytes > 8 << 20 and len(state) > 8 << 20
    # the positive control: QEMU's plaintext state carries the guest's RAM, marker included
    assert marker in state and marker.hex().encode() in state
    assert source.status() == "postmigrate"
    saved_log = source.serial_text()
    source.stop()
    complete = saved_log[: saved_log.rfind("\n") + 1]
    last_tick, last_counter, _ = [(int(m[1]), int(m[2]), m[3]) for m in TICK.finditer(complete)][-1]
    # the save may cut a tick line mid-way: its rest comes out of the restored guest, and the first
    # complete tick line there is then the one after it
    step = 1 if complete == saved_log else 2
    assert marker.hex() not in saved_log, "the console shows the marker's md5, never the marker"

    # a damaged state: QEMU refuses it, the guest never runs
    damaged = _start(vms, _launch(guest_image, tmp_path, "damaged", disk, append, incoming="defer"))
    read_end, write_end = os.pipe()
    feeder = _feed(write_end, bytes(state[: len(state) // 2]))
    with pytest.raises(QemuError, match="QEMU exited") as refused:
        damaged.load_state_from_fd(read_end, timeout=30)
    assert marker.hex() not in str(refused.value)
    os.close(read_end)
    feeder.join(10)
    assert damaged.process is not None and damaged.process.poll() not in (None, 0), "QEMU ends on a bad stream"
    assert "tick=" not in damaged.serial_text()

    target = _start(vms, _launch(guest_image, tmp_path, "target", disk, append, incoming="defer"))
    read_end, write_end = os.pipe()
    feeder = _feed(write_end, bytes(state))
    seconds = target.load_state_from_fd(read_end, timeout=60)
    os.close(read_end)
    feeder.join(10)
    print(f"saved {len(state) >> 20} MiB in {stats.seconds:.2f} s, loaded in {seconds:.2f} s")
    assert target.status() == "running"
    after = _ticks(target, 2)
    assert "ks-guest ready" not in target.serial_text(), "the guest resumed, it did not boot"
    assert after[0][0] == last_tick + step and after[0][1] == last_counter + step, (after, last_tick, last_counter)
    assert {t[2] for t in after} == {expected_md5}
