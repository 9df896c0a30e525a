"""One VM running on this host: its keys, its disks served over NBD on a local socket, its QEMU.

:func:`launch` turns a VM release (:class:`~keysteward.host.client.VmKeys`) into a running guest: each disk's
file is checked to be the volume the key manager named (its ``keysteward`` token), opened with the released
secret (wiped at once; the volume key stays in this process only, in a locked buffer), and served by an NBD
server of its own on a unix socket in the VM's run directory (mode 0700), which QEMU is the only client of.
QEMU gets no key: the guest's disks are plain NBD block devices to it.

:meth:`RunningVm.stop` pauses the guest, ends its QEMU, closes the exports (wiping the volume keys) and wipes
the VM key and the lease token. VM state leaves QEMU only through :mod:`keysteward.host.vm_state`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import KeystewardError
from keysteward.host.client import VmKeys
from keysteward.host.qemu import NbdDisk, QemuVm, VmLaunch
from keysteward.proxy.export import LuksExport
from keysteward.proxy.server import NbdServer
from keysteward.volume.kms_token import read_token
from keysteward.volume.luks_volume import LuksVolume

log = logging.getLogger("keysteward.host")
T = TypeVar("T")


MAX_SOCKET_PATH = 107
"""A unix socket's path is at most 107 bytes (sun_path) on Linux."""


def run_name(vm_id: str) -> str:
    """A VM's run directory under ``state_dir``: the first 12 hex digits of its id (short: the sockets live there)."""
    return vm_id.replace("-", "")[:12]


class LoopThread:
    """An asyncio event loop in a thread of its own: the NBD servers of every VM run on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ks-host-nbd", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class DiskMismatch(KeystewardError):
    code = "disk_mismatch"
    title = "A VM disk is not the volume the key manager named"


def open_disks(keys: VmKeys, *, shared: bool = False) -> dict[str, LuksExport]:
    """Each disk's file opened with its released secret (wiped here, whatever happens)."""
    exports: dict[str, LuksExport] = {}
    try:
        for disk in sorted(keys.disks, key=lambda d: d.position):
            token = read_token(disk.path)
            if token.ref.volume_id != disk.volume_id:
                raise DiskMismatch(f"{disk.path} holds volume {token.ref.volume_id}, not {disk.volume_id}")
            secret = bytearray(disk.secret.view())
            try:
                volume = LuksVolume.open(disk.path, secret, keyslot=token.keyslot, writable=True, shared=shared)
            finally:
                wipe_bytearray(secret)
                disk.secret.wipe()
            exports[f"disk{disk.position}"] = LuksExport(f"disk{disk.position}", volume)
    except BaseException:
        for export in exports.values():
            export.close()
        for disk in keys.disks:
            disk.secret.wipe()
        raise
    return exports


@dataclass
class RunningVm:
    vm_id: str
    name: str
    keys: VmKeys
    run_dir: Path
    nbd: NbdServer
    qemu: QemuVm
    accel: str
    started_at: float = field(default_factory=time.monotonic)
    expires: float = 0.0
    """The lease's expiry on the monotonic clock."""
    last_renewal: float = field(default_factory=time.monotonic)
    failing_since: float | None = None
    next_renewal: float = 0.0

    def stop(self, loop: LoopThread, reason: str) -> None:
        """Pause the guest, end QEMU, close the exports (the volume keys are wiped), wipe the VM key."""
        try:
            try:
                self.qemu.pause()
            except KeystewardError:
                pass  # QEMU gone or its monitor dead: it is ended below either way
            self.qemu.stop(timeout=2.0)
        finally:
            try:
                loop.call(self.nbd.stop(grace=5.0))
            except Exception:
                log.exception("NBD server of VM %s did not stop cleanly", self.name)
            finally:
                self.keys.wipe(lease=False)  # the lease token goes when the lease is given back (or is over)
                shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("vm stopped vm=%s reason=%s", self.name, reason)


def launch(
    keys: VmKeys,
    loop: LoopThread,
    state_dir: str,
    *,
    accel: str,
    qemu: str,
    incoming: bool = False,
    shared: bool = False,
) -> RunningVm:
    """Open the disks, serve them on the VM's socket, start QEMU (paused for an incoming state if asked)."""
    spec = keys.launch
    kernel, initrd = spec.get("kernel"), spec.get("initrd")
    if not isinstance(kernel, str) or not isinstance(initrd, str):
        raise KeystewardError("this host starts VMs by direct kernel boot: the VM needs launch kernel and initrd",
                              code="vm_launch")  # fmt: skip
    run_dir = Path(state_dir) / run_name(keys.vm_id)
    if len(str(run_dir / "nbd.sock")) > MAX_SOCKET_PATH:
        raise KeystewardError(f"state_dir {state_dir[:80]} is too long for the VMs' unix sockets "
                              f"(at most {MAX_SOCKET_PATH - 23} characters)", code="host_config")  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700, parents=True)
    exports = open_disks(keys, shared=shared)
    nbd = NbdServer(exports, tls=None, allow_plaintext=True)
    socket = run_dir / "nbd.sock"
    try:
        loop.call(nbd.serve_unix(str(socket)))
        os.chmod(socket, 0o600)
        machine = VmLaunch(
            name=f"ks-{keys.vm_id[:8]}", kernel=Path(kernel), initrd=Path(initrd), append=str(spec.get("append", "")),
            memory_mb=int(spec.get("memory_mb", 256)), cpus=int(spec.get("cpus", 1)),
            disks=tuple(NbdDisk(socket, name) for name in sorted(exports)), serial_log=run_dir / "serial.log",
            qmp_socket=run_dir / "qmp.sock", incoming="defer" if incoming else None,
            accel="kvm" if accel == "kvm" else "tcg",
        )  # fmt: skip
        vm = QemuVm(machine, qemu=qemu)
        vm.start()
    except BaseException:
        loop.call(nbd.stop(grace=1.0))
        keys.wipe(lease=False)
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return RunningVm(keys.vm_id, str(spec.get("name", keys.vm_id)), keys, run_dir, nbd, vm, machine.accel)
