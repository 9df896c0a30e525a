"""The QEMU argument vector of a VM launch, the guest's cpio writer and its /init template: pure, no QEMU."""

from __future__ import annotations

import json
import stat
from io import BytesIO
from pathlib import Path

import pytest

from keysteward.devcloud.cpio import CpioWriter
from keysteward.devcloud.guest import guest_append
from keysteward.devcloud.guest_init import guest_memory_mb, init_script
from keysteward.host.qemu import FileDisk, NbdDisk, QemuError, QemuVm, VmLaunch

pytestmark = pytest.mark.unit


def _launch(**changes: object) -> VmLaunch:
    base: dict[str, object] = {
        "name": "vm-1",
        "kernel": Path("/cache/vmlinuz"),
        "initrd": Path("/cache/initrd.gz"),
        "serial_log": Path("/run/vm 1/serial,log"),
        "qmp_socket": Path("/run/vm 1/qmp.sock"),
        "append": "console=ttyS0 quiet ks.fill_mb=4",
    }
    return VmLaunch(**{**base, **changes})  # type: ignore[arg-type]


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, item in enumerate(argv) if item == flag]


def test_argv_is_a_list_with_each_value_one_element() -> None:
    argv = _launch().argv(sandbox=False)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert _after(argv, "-display") == ["none"] and _after(argv, "-accel") == ["tcg"]
    assert _after(argv, "-append") == ["console=ttyS0 quiet ks.fill_mb=4"]  # one element, spaces and all
    assert _after(argv, "-m") == ["256"] and _after(argv, "-smp") == ["1"]
    # a comma in a path is doubled inside an option string, so it cannot start a new option
    assert "file,id=serial0,path=/run/vm 1/serial,,log" in _after(argv, "-chardev")
    assert _after(argv, "-mon") == ["chardev=qmp0,mode=control"]
    assert "-incoming" not in argv and "-sandbox" not in argv and "-blockdev" not in argv


def test_disks_are_blockdev_json_on_virtio_blk() -> None:
    disks = (NbdDisk(Path("/run/proxy,x.sock"), "vol,1 export"), FileDisk(Path("/data/d,isk.raw")))
    argv = _launch(disks=disks).argv(sandbox=False)
    specs = [json.loads(value) for value in _after(argv, "-blockdev")]
    assert specs == [
        {"driver": "nbd", "node-name": "disk0", "server": {"type": "unix", "path": "/run/proxy,x.sock"},
         "export": "vol,1 export"},
        {"driver": "raw", "node-name": "disk1", "file": {"driver": "file", "filename": "/data/d,isk.raw"}},
    ]  # fmt: skip
    assert _after(argv, "-device") == ["virtio-blk-pci,drive=disk0,id=vd0", "virtio-blk-pci,drive=disk1,id=vd1"]


def test_incoming_defer_and_sandbox() -> None:
    argv = _launch(incoming="defer", accel="kvm", machine="q35", memory_mb=1024, cpus=2).argv()
    assert _after(argv, "-incoming") == ["defer"]
    assert _after(argv, "-accel") == ["kvm"] and _after(argv, "-machine") == ["q35"]
    assert _after(argv, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny,spawn=deny"]
    spawning = _launch(allow_spawn=True).argv()
    assert _after(spawning, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"]


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "Bad Name"},
        {"name": ""},
        {"name": "-x"},
        {"memory_mb": 0},
        {"cpus": 0},
        {"append": "quiet\ninit=/bin/sh"},
    ],
)
def test_bad_launch_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _launch(**changes)


@pytest.mark.parametrize("changes", [{"kernel": Path("/a,b")}, {"initrd": Path("/x\n")}])
def test_bad_boot_paths_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _launch(**changes).argv()


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        name_size, file_size = fields[11], fields[6]
        name_at = offset + 110
        name = data[name_at : name_at + name_size - 1].decode()
        data_at = name_at + name_size + (-(110 + name_size) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (fields[1], data[data_at : data_at + file_size], (fields[9], fields[10]))
        offset = data_at + file_size + (-file_size % 4)


def test_cpio_newc_round_trip() -> None:
    out = BytesIO()
    cpio = CpioWriter(out)
    cpio.directory("dev")
    cpio.char_device("dev/console", 5, 1)
    cpio.file("init", b"#!/bin/sh\n", perm=0o755)
    cpio.file("odd", b"x" * 5)
    cpio.symlink("sh", "busybox")
    cpio.close()
    assert len(out.getvalue()) % 4 == 0
    entries = _read_cpio(out.getvalue())
    assert stat.S_ISDIR(entries["dev"][0])
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    assert entries["init"][1] == b"#!/bin/sh\n" and stat.S_IMODE(entries["init"][0]) == 0o755
    assert entries["odd"][1] == b"xxxxx" and entries["sh"][1] == b"busybox"
    with pytest.raises(ValueError):
        cpio.file("late", b"")


@pytest.mark.parametrize("name", ["/abs", "", "a\0b"])
def test_cpio_bad_names_refused(name: str) -> None:
    with pytest.raises(ValueError):
        CpioWriter(BytesIO()).file(name, b"")


def test_init_script_and_kernel_command_line() -> None:
    text = init_script(["virtio_ring", "virtio_blk"])
    assert text.startswith("#!/bin/busybox sh\n") and "for m in virtio_ring virtio_blk; do" in text
    assert text.index('echo "ks-guest ready"') < text.index("insmod")
    with pytest.raises(ValueError):
        init_script(["virtio; reboot"])
    marker = bytes(range(16))
    assert guest_append(marker=marker, fill_mb=8) == (
        "console=ttyS0 quiet panic=-1 ks.marker=000102030405060708090a0b0c0d0e0f ks.fill_mb=8"
    )
    assert guest_append() == "console=ttyS0 quiet panic=-1"
    with pytest.raises(ValueError):
        guest_append(fill_mb=-1)
    assert "MemAvailable" in text, "the fill is capped: an over-full tmpfs would OOM-kill init"
    assert guest_memory_mb(0) == 176 and guest_memory_mb(1024) >= 1024 + 200


def test_wait_serial_never_matches_a_half_written_line(tmp_path: Path) -> None:
    """QEMU writes the console as the guest prints: a line cut mid-way must not match ``$``."""
    log = tmp_path / "serial.log"
    vm = QemuVm(_launch(serial_log=log))
    log.write_text("ks-guest ready\nks-guest tick=1 counter=1 ram=2af210ce0e22e2c4ce1")
    pattern = r"^ks-guest tick=(\d+) counter=(\d+) ram=(\S+)$"
    with pytest.raises(QemuError, match="no serial line"):
        vm.wait_serial(pattern, 0.05)
    log.write_text("ks-guest ready\nks-guest tick=1 counter=1 ram=2af210ce0e22e2c4ce13942644fdedc2\n")
    assert vm.wait_serial(pattern, 0.05)[3] == "2af210ce0e22e2c4ce13942644fdedc2"
    assert vm.wait_serial(r"^ks-guest ready$", 0.05).start() == 0
