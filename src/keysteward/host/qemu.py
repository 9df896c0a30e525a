"""What launching a VM means on a host: the ``qemu-system-x86_64`` command line and its QMP control.

:class:`VmLaunch` is a VM's launch, frozen; :meth:`VmLaunch.argv` the argument vector (a list, never
a shell line; disks as ``-blockdev`` JSON, so no path or export name is ever parsed as options).
:class:`QemuVm` runs one launch: start, wait for serial output, pause, resume, stop, and the VM's
state (memory and devices) saved to or loaded from a file descriptor through QEMU's migration
stream (``migrate fd:NAME`` / ``migrate-incoming fd:NAME`` after ``getfd``).
:func:`probe_accel` says whether KVM boots a guest here, else TCG.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from keysteward.errors import KeystewardError
from keysteward.host.qmp import QmpClient, QmpCommandError, QmpError

QEMU_BINARY: Final = "qemu-system-x86_64"
Accel = Literal["kvm", "tcg"]
STATE_FD_NAME: Final = "ks-state"
#: bytes/s: QEMU's migration default (128 MiB/s) would throttle a local save
MAX_BANDWIDTH: Final = 1 << 40
_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
#: the first line of the test guest's /init: a KVM probe boot counts only when userspace ran
PROBE_LINE: Final = r"^ks-guest ready$"
_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"


class QemuError(KeystewardError):
    code = "qemu_failed"
    status = 500
    title = "QEMU failed"


@dataclass(frozen=True)
class NbdDisk:
    """A disk QEMU reads from an NBD server on a local unix socket (the keysteward proxy)."""

    socket: Path
    export: str


@dataclass(frozen=True)
class FileDisk:
    path: Path
    format: Literal["raw", "qcow2"] = "raw"


Disk = NbdDisk | FileDisk


def _plain_path(path: Path, what: str) -> str:
    text = str(path)
    if not text or any(c in text for c in ",\n\r\0"):
        raise ValueError(f"{what} path must not hold commas or control characters")
    return text


def _opt(text: str) -> str:
    """A value inside a QEMU option string: commas doubled."""
    if any(c in text for c in "\n\r\0"):
        raise ValueError("option value holds control characters")
    return text.replace(",", ",,")


@dataclass(frozen=True)
class VmLaunch:
    name: str
    kernel: Path
    initrd: Path
    serial_log: Path
    qmp_socket: Path
    memory_mb: int = 256
    cpus: int = 1
    append: str = ""
    disks: tuple[Disk, ...] = ()
    incoming: Literal["defer"] | None = None
    accel: Accel = "tcg"
    machine: Literal["pc", "q35"] = "pc"
    #: ``-sandbox`` also denies spawning, unless a plaintext ``exec:`` migration (a bench baseline) needs it
    allow_spawn: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError("VM name must be 1-63 of a-z, 0-9 and '-'")
        if not 16 <= self.memory_mb <= 1 << 20 or not 1 <= self.cpus <= 256:
            raise ValueError("memory_mb or cpus out of range")
        if any(c in self.append for c in "\n\r\0"):
            raise ValueError("kernel command line holds control characters")

    def argv(self, *, qemu: str = QEMU_BINARY, sandbox: bool = True) -> list[str]:
        argv = [
            qemu,
            "-name", _opt(self.name),
            "-nodefaults", "-no-user-config", "-display", "none", "-msg", "timestamp=off",
            "-machine", self.machine, "-accel", self.accel,
            "-m", str(self.memory_mb), "-smp", str(self.cpus),
            "-kernel", _plain_path(self.kernel, "kernel"),
            "-initrd", _plain_path(self.initrd, "initrd"),
            "-append", self.append,
            "-chardev", f"file,id=serial0,path={_opt(str(self.serial_log))}",
            "-serial", "chardev:serial0",
            "-chardev", f"socket,id=qmp0,path={_opt(str(self.qmp_socket))},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
        ]  # fmt: skip
        for index, disk in enumerate(self.disks):
            node = f"disk{index}"
            spec: dict[str, Any]
            if isinstance(disk, NbdDisk):
                server = {"type": "unix", "path": str(disk.socket)}
                spec = {"driver": "nbd", "node-name": node, "server": server, "export": disk.export}
            else:
                protocol = {"driver": "file", "filename": str(disk.path)}
                spec = {"driver": disk.format, "node-name": node, "file": protocol}
            argv += ["-blockdev", json.dumps(spec), "-device", f"virtio-blk-pci,drive={node},id=vd{index}"]
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        if sandbox:
            argv += ["-sandbox", _SANDBOX if self.allow_spawn else _SANDBOX + ",spawn=deny"]
        return argv


_SANDBOX_SUPPORT: dict[str, bool] = {}


def sandbox_supported(qemu: str = QEMU_BINARY) -> bool:
    """Whether this QEMU was built with seccomp (``-sandbox``); asked once per process."""
    if qemu not in _SANDBOX_SUPPORT:
        try:
            done = subprocess.run(
                [qemu, "-sandbox", "on", "-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
                input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            _SANDBOX_SUPPORT[qemu] = done.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _SANDBOX_SUPPORT[qemu] = False
    return _SANDBOX_SUPPORT[qemu]


@dataclass(frozen=True)
class MigrationStats:
    status: str
    total_time_ms: int
    downtime_ms: int
    transferred_bytes: int
    seconds: float


@dataclass
class QemuVm:
    """One QEMU process for ``launch``; every wait is bounded."""

    launch: VmLaunch
    qemu: str = QEMU_BINARY
    pass_fds: Sequence[int] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    qmp: QmpClient | None = field(default=None, init=False)
    _stderr: Any = field(default=None, init=False)

    def start(self, timeout: float = 15.0) -> None:
        argv = self.launch.argv(qemu=self.qemu, sandbox=sandbox_supported(self.qemu))
        self.launch.serial_log.unlink(missing_ok=True)
        self.launch.qmp_socket.unlink(missing_ok=True)
        self._stderr = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
                pass_fds=tuple(self.pass_fds), close_fds=True,
            )  # fmt: skip
        except OSError as exc:
            raise QemuError(f"cannot run {self.qemu}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        while self.qmp is None:
            self._check_alive()
            if self.launch.qmp_socket.exists():
                try:
                    self.qmp = QmpClient(self.launch.qmp_socket, timeout=max(1.0, deadline - time.monotonic()))
                except QmpError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise
            if time.monotonic() > deadline:
                self.kill()
                raise QemuError("QEMU's monitor socket did not come up in time")
            time.sleep(0.005)  # QEMU is up in ~100 ms: a coarser poll adds to every start

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise QemuError(f"QEMU exited with {self.process.returncode}: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return str(self._stderr.read()[-400:].decode(errors="replace").strip())

    def monitor(self) -> QmpClient:
        """The VM's QMP session, for commands beyond the ones here (``system_reset``, queries)."""
        if self.qmp is None:
            raise QemuError("VM not started")
        return self.qmp

    def serial_text(self) -> str:
        try:
            return self.launch.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, pattern: str | re.Pattern[str], timeout: float, *, start: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the complete lines of the serial log at or after ``start``.

        Only text up to the last newline is searched: QEMU writes the console as the guest prints it,
        so the log's last line may be half written, and ``$`` would match its end.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial_text()
            found = regex.search(text, start, text.rfind("\n") + 1)
            if found:
                return found
            self._check_alive()
            if time.monotonic() > deadline:
                raise QemuError(f"no serial line matching {regex.pattern!r} within {timeout:g} s")
            time.sleep(0.02)

    def status(self) -> str:
        return str(self.monitor().execute("query-status").get("status", ""))

    def pause(self) -> None:
        self.monitor().execute("stop")

    def resume(self) -> None:
        self.monitor().execute("cont")

    def stop(self, timeout: float = 5.0) -> None:
        """Pause the guest, ask QEMU to quit, then terminate and at last kill it."""
        if self.process is None:
            return
        if self.qmp is not None and self.process.poll() is None:
            try:
                self.qmp.execute("stop", timeout=timeout)
                self.qmp.execute("quit", timeout=timeout)
            except QmpError:
                pass
        self.kill(grace=timeout)

    def kill(self, grace: float = 2.0) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.process is not None:
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=grace)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> QemuVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------------------------

    def save_state_to_fd(self, fd: int, timeout: float = 300.0) -> MigrationStats:
        """Pause the guest and write its state to ``fd``; the guest stays paused (``postmigrate``)."""
        self.monitor().send_fd(fd, STATE_FD_NAME)
        return self.save_state_to_uri(f"fd:{STATE_FD_NAME}", timeout)

    def save_state_to_uri(self, uri: str, timeout: float = 300.0) -> MigrationStats:
        """As :meth:`save_state_to_fd` for any migration URI (``exec:`` needs ``allow_spawn``)."""
        qmp = self.monitor()
        began = time.monotonic()
        qmp.execute("stop")
        qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        qmp.execute("migrate", {"uri": uri})
        info = self._wait_migration(began + timeout)
        ram = info.get("ram", {}) if isinstance(info.get("ram"), dict) else {}
        return MigrationStats(
            status=str(info.get("status")),
            total_time_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            transferred_bytes=int(ram.get("transferred", 0)),
            seconds=time.monotonic() - began,
        )

    def load_state_from_fd(self, fd: int, timeout: float = 300.0) -> float:
        """Read the state from ``fd`` into a VM launched with ``incoming="defer"``, then run it; seconds taken."""
        self.monitor().send_fd(fd, STATE_FD_NAME)
        return self.load_state_from_uri(f"fd:{STATE_FD_NAME}", timeout)

    def load_state_from_uri(self, uri: str, timeout: float = 300.0) -> float:
        if self.launch.incoming != "defer":
            raise QemuError("loading state needs a VM launched with incoming='defer'")
        qmp = self.monitor()
        began = time.monotonic()
        qmp.execute("migrate-incoming", {"uri": uri})
        self._wait_migration(began + timeout)
        if self.status() != "running":
            try:
                qmp.execute("cont")
            except QmpCommandError as exc:  # autostart may have won the race
                if self.status() != "running":
                    raise QemuError(f"guest did not resume after loading its state: {exc.error_class}") from None
        return time.monotonic() - began

    def _wait_migration(self, deadline: float) -> dict[str, Any]:
        qmp = self.monitor()
        while True:
            try:
                info = qmp.execute("query-migrate")
            except QmpError:
                # QEMU ends itself when an incoming stream does not load: say so, not "broken pipe"
                if self.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=2.0)
                self._check_alive()
                raise
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                reason = str(info.get("error-desc", ""))[:200]
                raise QemuError(f"migration {status}: {reason}")
            self._check_alive()
            if time.monotonic() > deadline:
                raise QemuError(f"migration not complete in time (status {status})")
            time.sleep(0.01)


_PROBED: dict[str, Accel] = {}


def probe_accel(
    kernel: Path, initrd: Path, *, timeout: float = 4.0, first_line: str = PROBE_LINE, qemu: str = QEMU_BINARY
) -> Accel:
    """``"kvm"`` only if a guest booted under KVM prints ``first_line`` within ``timeout``, else ``"tcg"``.

    ``/dev/kvm`` opening is not enough: on some hosts a KVM guest hangs. The line waited for is the
    test guest's (keysteward.devcloud.guest) first line from its /init, not any kernel message: a
    kernel may print an early warning and then hang. Asked once per process.
    """
    if "accel" in _PROBED:
        return _PROBED["accel"]
    answer: Accel = "tcg"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        with tempfile.TemporaryDirectory(prefix="ks-kvm-probe-") as tmp:
            launch = VmLaunch(
                name="kvm-probe", kernel=kernel, initrd=initrd, memory_mb=128, accel="kvm",
                append="console=ttyS0 quiet panic=-1", serial_log=Path(tmp) / "serial.log",
                qmp_socket=Path(tmp) / "qmp.sock",
            )  # fmt: skip
            vm = QemuVm(launch, qemu=qemu)
            try:
                vm.start(timeout=timeout)
                vm.wait_serial(first_line, timeout)
                answer = "kvm"
            except (QemuError, QmpError):
                answer = "tcg"
            finally:
                vm.kill(grace=0.5)
    _PROBED["accel"] = answer
    return answer
