"""A hypervisor host for bench/vm_state.py: a real keysteward server, a tenant with a VM, a real host agent.

Not a bench itself: bench/vm_state.py and bench/migration.py are, and end with their
``{"bench": NAME, "figures": [...]}`` line. :func:`make_site` sets up what tests/e2e/test_vm_hosts.py sets
up, minus the TPM (a host may run without one: the tenant has no policy that asks for a quote): a server
process, tenant ``bench``, a tenant key, its CA, a host certificate for ``host-a``, a 4 MiB LUKS2 volume of
the key manager as the VM's disk, ``keysteward vm create`` with the test guest's kernel and initramfs, and
one ``keysteward host run`` process (TCG, orders polled every ``POLL_SECONDS``). :func:`plain_vm` is the
same guest under plain QEMU with an unencrypted raw disk file: the bench's reference.

Serial lines are found by :func:`wait_line`, which polls the log every 5 ms (both sides the same way).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from _common import BenchError, Cleanup, KeystewardServer, _clean_env, keysteward_cli, make_temp_dir, say

from keysteward.agent.kms_volume import KmsVolumeSpec, create_kms_volume
from keysteward.crypto import x509csr
from keysteward.devcloud.guest import GuestImage, build_guest
from keysteward.host.qemu import FileDisk, QemuVm, VmLaunch
from keysteward.host.running import run_name
from keysteward.volume.create import CreateOptions

MIB: Final = 1 << 20
HOST: Final = "host-a"
VM: Final = "bench-vm"
POLL_SECONDS: Final = 0.1
READY: Final = re.compile(rb"ks-guest ready\r?\n")
TICK: Final = re.compile(rb"ks-guest tick=\d+ ")


def guest_cache_dir() -> Path:
    configured = os.environ.get("KEYSTEWARD_GUEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "keysteward" / "guest"


def wait_line(path: Path, pattern: re.Pattern[bytes], timeout: float, *, start: int = 0, alive: Any = None) -> float:
    """perf_counter() when ``pattern`` first shows in ``path`` at or after offset ``start`` (5 ms polls)."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        if pattern.search(data, start):
            return time.perf_counter()
        if alive is not None:
            alive()
        if time.perf_counter() > deadline:
            raise BenchError(f"no {pattern.pattern!r} in {path} within {timeout:g} s: {data[-300:]!r}")
        time.sleep(0.005)


@dataclass(frozen=True)
class Boot:
    """Milliseconds from the command to QEMU's serial log appearing (QEMU runs) and to the first line."""

    opened: float
    ready: float

    def text(self) -> str:
        return f"{self.opened:.0f} ms to QEMU, {self.ready:.0f} ms to the first line"


def watch_boot(path: Path, began: float, timeout: float, *, alive: Any = None) -> Boot:
    """Watch ``path`` (absent before the command at wall time ``began``): its creation time, then READY.

    The creation time is the file's ctime at first sight, taken before the guest writes to it (its
    first line comes seconds after QEMU opens the file), so both sides measure it the same way."""
    deadline = time.perf_counter() + timeout
    opened = 0.0
    while not opened:
        try:
            opened = os.stat(path).st_ctime
        except FileNotFoundError:
            if alive is not None:
                alive()
            if time.perf_counter() > deadline:
                raise BenchError(f"{path} did not appear within {timeout:g} s") from None
            time.sleep(0.002)
    wait_line(path, READY, max(1.0, deadline - time.perf_counter()), alive=alive)
    return Boot((opened - began) * 1000, (time.time() - began) * 1000)


@dataclass
class VmSite:
    server: KeystewardServer
    admin: str
    tmp: Path
    guest: GuestImage
    append: str
    memory_mb: int
    vm_id: str
    host: subprocess.Popen[bytes]
    host_log: Path

    @property
    def serial(self) -> Path:
        return self.tmp / "host-run" / run_name(self.vm_id) / "serial.log"

    def _env(self) -> dict[str, str]:
        return _clean_env(KEYSTEWARD_DATA_DIR=str(self.server.data_dir), KEYSTEWARD_TOKEN=self.admin)

    def cli(self, *args: str, timeout: float = 900.0) -> tuple[dict[str, Any], float]:
        """``keysteward ARGS --json`` as the tenant admin: (its JSON, wall seconds)."""
        began = time.perf_counter()
        done = subprocess.run([*keysteward_cli(), *args, "--json"], env=self._env(), capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip
        seconds = time.perf_counter() - began
        if done.returncode != 0:
            raise BenchError(f"keysteward {' '.join(args[:2])} failed: {done.stderr.strip()[-600:]}\n{self.log_tail()}")
        return json.loads(done.stdout), seconds

    def start_to_ready(self) -> tuple[Boot, dict[str, Any]]:
        """``vm start``: from the command to QEMU and to the guest's first serial line; the order."""
        began = time.time()
        proc = subprocess.Popen([*keysteward_cli(), "vm", "start", VM, "--host", HOST, "--json"], env=self._env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

        def alive() -> None:
            if proc.poll() not in (None, 0):
                raise BenchError(
                    f"vm start failed: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}"
                )

        try:
            boot = watch_boot(self.serial, began, 180, alive=alive)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise BenchError(f"vm start failed: {err.decode(errors='replace')}")
        return boot, json.loads(out)

    def stop_vm(self) -> None:
        self.cli("vm", "stop", VM)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.host_log.read_text(errors="replace").splitlines()[-10:])
        except OSError:
            return ""


def make_site(cleanup: Cleanup, *, memory_mb: int, append: str) -> VmSite:
    began = time.monotonic()
    guest = build_guest(guest_cache_dir())
    tmp = make_temp_dir(cleanup, "ks-bench-vm-")
    server = KeystewardServer.init(cleanup)
    server.start(cleanup)
    root = server.root_token
    admin = str(server.post_ok("/v1/tenants", {"name": "bench"}, root)["admin_token"]["token"])
    server.post_ok("/v1/keys", {"name": "volumes"}, admin)
    server.post_ok("/v1/ca/init", {}, admin)
    key_pem, csr = x509csr.make_csr("bench", "host", HOST)
    issued = server.post_ok("/v1/ca/issue", {"name": HOST, "role": "host", "csr_pem": csr.decode()}, admin)
    (tmp / "host.pem").write_text(issued["cert_pem"])
    (tmp / "host.key").write_bytes(bytes(key_pem))
    (tmp / "host.key").chmod(0o600)
    disk = tmp / "root.img"
    create_kms_volume(str(disk), KmsVolumeSpec(url=server.url, key="volumes", host=HOST, name="bench-root"),
                      CreateOptions(size=4 * MIB), admin_token=admin, ca_file=server.ca_file)  # fmt: skip
    config = tmp / "host.toml"
    config.write_text(
        f'state_dir = "{tmp}/host-run"\nsnapshot_dir = "{tmp}/snapshots"\npoll_seconds = {POLL_SECONDS}\n'
        f'status_file = "{tmp}/host.status.json"\n[kms]\nurl = "{server.url}"\nca_file = "{server.ca_file}"\n'
        f'cert_file = "{tmp}/host.pem"\nkey_file = "{tmp}/host.key"\ngrace_seconds = 30\n[qemu]\naccel = "tcg"\n'
    )
    host_log = tmp / "host.log"
    with host_log.open("ab") as log:
        host = subprocess.Popen([*keysteward_cli(), "host", "run", "--config", str(config)], stdout=log, stderr=log,
                                env=_clean_env(), start_new_session=True)  # fmt: skip
    cleanup.push("stop the host agent", lambda: _stop(host))
    site = VmSite(server, admin, tmp, guest, append, memory_mb, "", host, host_log)
    made, _ = site.cli("vm", "create", VM, "--volume", f"bench-root={disk}", "--key", "volumes", "--memory",
                       str(memory_mb), "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
                       "--append", append, "--lease-seconds", "60", "--renew-seconds", "10")  # fmt: skip
    site.vm_id = str(made["id"])
    deadline = time.monotonic() + 60
    while not (tmp / "host.status.json").exists():
        if host.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"the host agent did not come up:\n{site.log_tail()}")
        time.sleep(0.1)
    say(f"[vm] server, tenant, CA, host certificate, kms volume, VM and host agent ({time.monotonic() - began:.1f} s)")
    return site


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # the agent ends its VMs (QEMU paused and ended) before it exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def plain_vm(site: VmSite, label: str, *, incoming: bool = False, disk_name: str = "plain-root.img") -> QemuVm:
    """The same guest under plain QEMU: same kernel, initramfs, command line and memory, a raw disk file
    (``disk_name``: a VM that runs beside another plain one needs its own, QEMU locks the file)."""
    run = site.tmp / f"plain-{label}"
    run.mkdir(mode=0o700, exist_ok=True)
    disk = site.tmp / disk_name
    if not disk.exists():
        with disk.open("wb") as f:
            f.truncate(4 * MIB)
    launch = VmLaunch(
        name=f"bench-plain-{label}", kernel=site.guest.kernel, initrd=site.guest.initrd, append=site.append,
        memory_mb=site.memory_mb, disks=(FileDisk(disk),), serial_log=run / "serial.log",
        qmp_socket=run / "qmp.sock", incoming="defer" if incoming else None, accel="tcg", allow_spawn=True,
    )  # fmt: skip
    return QemuVm(launch)
