"""Live migration end to end (docs/hosts.md, Migration): real key manager, two host agents, QEMU (TCG), swtpm.

The hosts and guest of tests/e2e/test_vm_hosts.py: host-a runs the VM (its disk a LUKS2 volume both hosts
reach), host-b is the destination. What must hold:

- a migration completes over TLS: the guest's tick count goes on on host-b (its RAM moved: no reboot), its
  disk counter continues, the VM's lease moved (host-a's ended, host-b's active, never both), and the
  volume key left host-a's agent while host-b's holds it; the order carries the source's last progress
  (completed, with the downtime); the VM then migrates back to host-a;
- a destination whose PCR 7 is not the approved one is refused before any state moves: it holds no key,
  its incoming lease never existed, and the guest ticks on on host-a under its lease; a second destination
  ordered while a migration is open is refused (one at a time); a destination whose QEMU dies before the
  switchover: the order fails, its incoming lease is cancelled and its key wiped, the guest runs on on host-a;
- the destination's QEMU accepts only the source's migration certificate: a client presenting the tenant's
  ordinary host certificate (same CA) is refused by the TLS authz, the real source then migrates, and the
  bytes a TCP relay between them recorded hold no trace of the guest's RAM marker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path

import pytest

from keysteward.agent.tpm import TpmDevice
from keysteward.crypto import x509ca, x509csr
from keysteward.crypto.x509migration import issue_migration_cert, make_migration_csr, migration_dn, migration_hostname
from keysteward.devcloud.guest import GuestImage, guest_append
from keysteward.host import migration
from keysteward.host.qemu import QemuVm, VmLaunch
from keysteward.host.running import run_name
from tests.e2e.test_vm_hosts import (  # noqa: F401 - fixtures
    MARKER,
    HostProcess,
    Site,
    _open_policy,
    hosts,
    make_vm,
    site,
    start_host,
    ticks,
)
from tests.support.daemons import memory_holds

pytestmark = pytest.mark.e2e


def _pin_host_b(site: Site) -> TpmDevice:  # noqa: F811
    device = TpmDevice(site.tpms["host-b"].tcti, workdir=site.tmp / "tpm-b-work")
    _, ak = device.ensure_keys()
    site.call("PUT", "/attest/tpm/keys", {"instance": "host:host-b", "ak_public": base64.b64encode(ak).decode()})
    return device


def _leases(site: Site, vm_id: str) -> dict[str, list[str]]:  # noqa: F811
    found: dict[str, list[str]] = {}
    for lease in site.call("GET", f"/leases?volume={vm_id}"):
        found.setdefault(lease["holder"], []).append(lease["state"])
    return found


def web_on_host_a(site: Site, hosts: list[HostProcess]) -> tuple[bytes, HostProcess, HostProcess, str]:  # noqa: F811
    """The VM ``web`` running on host-a (TPM enrolled), host-b's agent up with its TPM pinned: (volume key,
    host-a, host-b, the VM's id)."""
    _, key = make_vm(site)
    host_a = start_host(site, hosts, "host-a")
    host_b = start_host(site, hosts, "host-b")
    site.cli("host", "enroll-tpm", "--config", str(site.tmp / "host-a.toml"))
    _pin_host_b(site)
    vm_id = json.loads(site.cli("vm", "start", "web", "--host", "host-a", "--json").stdout)["vm_id"]
    return key, host_a, host_b, vm_id


def test_a_vm_migrates_to_an_attested_host_and_the_source_lets_go(
    site: Site,  # noqa: F811
    hosts: list[HostProcess],  # noqa: F811
) -> None:
    key, host_a, host_b, vm_id = web_on_host_a(site, hosts)
    before = ticks(site, "host-a", vm_id, after=2)
    assert memory_holds(host_b.proc.pid, {"volume key": key}) == set()

    done = site.cli("vm", "migrate", "web", "--to", "host-b", "--json", check=False)
    assert done.returncode == 0, done.stderr
    migrated = json.loads(done.stdout)
    assert migrated["state"] == "done" and migrated["kind"] == "migrate", migrated
    assert migrated["result"]["source"] == "host-a" and migrated["result"]["host"] == "host-b"
    # the source's last progress report is on the order: completed, with QEMU's downtime
    assert migrated["progress"]["status"] == "completed" and migrated["progress"]["downtime_ms"] > 0, migrated
    after = ticks(site, "host-b", vm_id, after=1)
    assert after[0][0] > before[-1][0] >= 3  # RAM moved: the tick count goes on (a fresh boot starts at 1)
    assert after[-1][1] >= before[-1][1] and after[-1][2] == before[-1][2]  # disk counter and RAM checksum
    host_a.wait(lambda s: s.get("vms") == {}, timeout=15)
    assert "web" in host_b.status()["vms"]
    # the source let go: its lease ended (a renewal answers "ended"), the key left its agent's memory
    leases = _leases(site, vm_id)
    assert leases["host:host-a"][0] == "ended" and leases["host:host-b"][0] == "active", leases
    assert memory_holds(host_a.proc.pid, {"volume key": key}) == set()
    assert memory_holds(host_b.proc.pid, {"volume key": key}) == {"volume key"}
    assert json.loads(site.cli("vm", "show", "web", "--json").stdout)["host"] == "host-b"
    actions = [r["action"] for r in site.audit()]
    for action in ("vm.migration_requested", "vm.migrate", "vm.migration_certificate", "vm.migration_ready",
                   "vm.migration_source", "vm.switchover"):  # fmt: skip
        assert action in actions, action
    switch = [r for r in site.audit() if r["action"] == "vm.switchover"][-1]
    assert set(switch["details"]["lease_moves"].values()) == {"ended", "active"}
    # the destination keeps renewing; the old source asking for the VM now is a suspected clone
    time.sleep(2)
    assert "web" in host_b.status()["vms"]
    clone = site.cli("vm", "start", "web", "--host", "host-a", check=False)
    assert clone.returncode == 1 and "suspected_clone" in clone.stderr, clone.stderr
    # and back: a VM that came in by a migration leaves by another (its QEMU holds the first one's objects)
    on_b = ticks(site, "host-b", vm_id, after=len(after))
    back = site.cli("vm", "migrate", "web", "--to", "host-a", "--json", check=False)
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["result"]["source"] == "host-b"
    home = ticks(site, "host-a", vm_id, after=1)
    assert home[0][0] > on_b[-1][0] and home[-1][2] == on_b[-1][2]  # the same RAM, still counting
    host_b.wait(lambda s: s.get("vms") == {}, timeout=15)


def test_a_refused_or_dying_destination_leaves_the_vm_on_its_source(
    site: Site,  # noqa: F811
    hosts: list[HostProcess],  # noqa: F811
) -> None:
    _, key = make_vm(site)
    host_a = start_host(site, hosts, "host-a")
    host_b = start_host(site, hosts, "host-b")
    site.cli("host", "enroll-tpm", "--config", str(site.tmp / "host-a.toml"))
    device = _pin_host_b(site)
    device.extend(7, "ab" * 32)
    good = TpmDevice(site.tpms["host-a"].tcti, workdir=site.tmp / "tpm-a-work")
    pcr7 = good.quote(b"\x00" * 32, {"sha256": [7]})["pcrs"]["sha256"]["7"]
    policy = site.tmp / "hosts.cedar"
    policy.write_text(
        '@id("hosts-any")\npermit (principal is Keysteward::Host, action, resource is Keysteward::Vm);\n'
        '@id("migrate-pcr7")\nforbid (principal is Keysteward::Host, action == Keysteward::Action::"vm_migrate",'
        " resource is Keysteward::Vm)\nunless { context.platform has pcrs && context.platform.pcrs has sha256_7"
        f' && context.platform.pcrs.sha256_7 == "{pcr7}" }};\n'
    )
    site.cli("policy", "set", str(policy))
    started = json.loads(site.cli("vm", "start", "web", "--host", "host-a", "--json").stdout)
    vm_id = started["vm_id"]
    before = ticks(site, "host-a", vm_id, after=1)

    refused = site.cli("vm", "migrate", "web", "--to", "host-b", check=False)
    assert refused.returncode == 1 and "forbidden_by_policy" in refused.stderr and "migrate-pcr7" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert memory_holds(host_b.proc.pid, {"volume key": key}) == set()
    assert not (site.tmp / "host-b-run" / run_name(vm_id)).exists()
    assert set(_leases(site, vm_id)) == {"host:host-a"}  # no incoming lease was ever granted
    later = ticks(site, "host-a", vm_id, after=len(before) + 1)
    assert later[-1][0] > before[-1][0] and host_a.status()["vms"]["web"]["vm_id"] == vm_id
    # a refused migration is over: another may be ordered; this time the destination dies before switchover
    site.cli("policy", "set", str(_open_policy(site)))
    before = ticks(site, "host-a", vm_id)
    order = site.call("POST", "/vms/web/migrate", {"host": "host-b"})
    # one migration at a time: a second destination ordered meanwhile is refused
    with site.server.http(site.admin) as c:
        racing = c.post("/vms/web/migrate", json={"host": "host-c"})
    assert racing.status_code == 409 and racing.json()["code"] == "migration_in_progress", racing.text
    # the destination's QEMU dies before the switchover
    deadline = time.monotonic() + 60
    while (pid := _qemu_of(site.tmp / "host-b-run" / run_name(vm_id))) is None:
        assert time.monotonic() < deadline, "host-b never launched QEMU"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    while (answer := site.call("GET", f"/vm-orders/{order['id']}"))["state"] in ("pending", "taken"):
        assert time.monotonic() < deadline + 60, answer
        time.sleep(0.2)
    assert answer["state"] == "failed", answer
    # the source keeps running and keeps its lease; the destination's incoming lease is cancelled, its key wiped
    later = ticks(site, "host-a", vm_id, after=len(before) + 2)
    assert later[-1][0] > before[-1][0] and host_a.status()["vms"]["web"]["vm_id"] == vm_id
    leases = _leases(site, vm_id)
    assert leases["host:host-a"][0] == "active" and leases["host:host-b"] == ["cancelled"], leases
    host_b.wait(lambda s: s.get("vms") == {}, timeout=15)
    assert memory_holds(host_b.proc.pid, {"volume key": key}) == set()
    assert json.loads(site.cli("vm", "show", "web", "--json").stdout)["host"] == "host-a"


def _qemu_of(run_dir: Path) -> int | None:
    """The pid of a QEMU whose command line names ``run_dir``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"qemu-system" in cmdline and str(run_dir).encode() in cmdline:
            return int(proc.name)
    return None


def _tls_client_refused(address: str, ca: Path, cert: Path, key: Path, hostname: str) -> bool:
    """Whether the listener drops a TLS client presenting ``cert`` (True) or keeps it (False)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(ca))
    context.load_cert_chain(str(cert), str(key))
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=hostname) as tls:
                tls.settimeout(3)
                return tls.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            return True
        except TimeoutError:
            return False


class Relay:
    """A TCP relay between the hosts that records every byte the source sends."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.recorded = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()
        self._pump(client, upstream, self.recorded)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                if record is not None:
                    record += chunk
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_the_destination_accepts_only_the_migration_certificate(tmp_path: Path, guest_image: GuestImage) -> None:
    ca_pem, ca_key = x509ca.new_ca("acme CA")
    migration_id = str(uuid.uuid4())
    ends = {}
    for end in ("source", "destination"):
        key_pem, csr = make_migration_csr(migration_id, end)
        issued = issue_migration_cert(ca_pem, ca_key, migration_id=migration_id, end=end, csr_pem=csr, minutes=5)
        ends[end] = (issued.cert_pem, key_pem)
    host_key, host_csr = x509csr.make_csr("acme", "host", "host-b")
    host = x509ca.issue_client_cert(ca_pem, ca_key, tenant="acme", role="host", name="host-b", csr_pem=host_csr)
    (tmp_path / "ca.pem").write_text(ca_pem)
    (tmp_path / "host.pem").write_text(host.cert_pem)
    (tmp_path / "host.key").write_bytes(bytes(host_key))
    (tmp_path / "src.pem").write_text(ends["source"][0])
    (tmp_path / "src.key").write_bytes(bytes(ends["source"][1]))

    def machine(name: str, incoming: bool) -> QemuVm:
        run = tmp_path / name
        run.mkdir()
        return QemuVm(VmLaunch(name=name, kernel=guest_image.kernel, initrd=guest_image.initrd, memory_mb=128,
                               append=guest_append(marker=MARKER), serial_log=run / "serial.log",
                               qmp_socket=run / "qmp.sock", incoming="defer" if incoming else None))  # fmt: skip

    with machine("src", False) as source, machine("dst", True) as dest:
        source.start()
        dest.start()
        source.wait_serial(r"ks-guest tick=2 ", 180)
        dst_tls = migration.write_tls_dir(tmp_path / "dst", "destination", ca_pem, *ends["destination"])
        address = migration.free_address()
        migration.listen(dest, dst_tls, migration_dn(migration_id, "source"), address)
        hostname = migration_hostname(migration_id)
        ca, cert, key = tmp_path / "ca.pem", tmp_path / "host.pem", tmp_path / "host.key"
        assert _tls_client_refused(address, ca, cert, key, hostname)  # the tenant's host certificate: refused
        assert dest.status() == "inmigrate"
        assert "authz" in dest.stderr_tail() and "CN=host-b" in dest.stderr_tail(), dest.stderr_tail()
        # the control: the source's migration certificate passes the authz (and the real source migrates)
        src_tls = migration.write_tls_dir(tmp_path / "src", "source", ca_pem, *ends["source"])
        relay = Relay(address)  # the wire between the hosts
        migration.send(source, src_tls, hostname, relay.address)
        deadline = time.monotonic() + 60
        migration.wait_for(source, "pre-switchover", deadline)
        assert source.monitor().execute("query-migrate")["status"] == "pre-switchover"
        source.monitor().execute("migrate-continue", {"state": "pre-switchover"})
        migration.wait_for(source, "completed", deadline)
        migration.wait_for(dest, "completed", deadline)
        tick = dest.wait_serial(r"ks-guest tick=(\d+) ", 30)
        assert int(tick.group(1)) >= 3  # RAM moved: no reboot
        # the guest's RAM (its 4 MiB marker among it) crossed the wire, encrypted: no marker in the bytes
        assert len(relay.recorded) > 4 << 20 and bytes(relay.recorded[:1]) == b"\x16"  # a TLS handshake record
        assert MARKER not in relay.recorded
