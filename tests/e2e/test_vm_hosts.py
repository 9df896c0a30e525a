"""Hypervisor hosts end to end (docs/hosts.md): real key manager, real host agents, real QEMU (TCG), swtpm.

Two hosts of tenant ``acme``, each a ``keysteward host run`` process with its host certificate and its own
swtpm (host-a enrolls its AK by MakeCredential against its EK certificate; host-b's AK is pinned by an
admin), and a VM whose disk is a LUKS2 volume of the key manager. The guest writes a 4 MiB RAM marker and a
disk counter and ticks on its serial console. What must hold:

- an attested host starts the VM; a snapshot with memory holds neither the RAM marker nor the disk's volume
  key, nor does any file keysteward wrote; restored, the guest's RAM is back (its tick count goes on) and
  its disk counter continues;
- a host whose PCR 7 is not the approved one is refused with the policy's reason, receives no key (its
  memory is scanned) and launches nothing;
- a second host starting the VM while the first runs it: ``suspected_clone``, audited and alerted;
- ``vm revoke`` while it runs: the guest stops within a renewal and the volume key leaves the host agent's
  memory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from keysteward.agent.kms_volume import KmsVolumeSpec, create_kms_volume
from keysteward.agent.tpm import TpmDevice
from keysteward.crypto import x509csr
from keysteward.devcloud.guest import GuestImage, guest_append
from keysteward.devcloud.guest_init import MARKER_BYTES
from keysteward.host.running import run_name
from keysteward.volume.create import CreateOptions
from keysteward.volume.kdf import KdfChoice
from tests.e2e.test_proxy import BREAK_GLASS, volume_key
from tests.fixtures.keysteward import KEYSTEWARD, SecretRegistry, ServerProcess, init_manager
from tests.support.daemons import Daemon, memory_holds
from tests.support.swtpm import Swtpm, running_swtpm

pytestmark = pytest.mark.e2e
MIB = 1 << 20
TICK = re.compile(r"^ks-guest tick=(\d+) counter=(\d+) ram=(\S+)$", re.MULTILINE)
MARKER = hashlib.sha256(b"keysteward vm marker").digest()[:16]


class HostProcess(Daemon):
    name = "host agent"

    def __init__(self, tmp: Path, name: str, config: str, registry: SecretRegistry) -> None:
        self.status_file = tmp / f"{name}.status.json"
        self.log = tmp / f"{name}.log"
        registry.place(self.log)
        (tmp / f"{name}.toml").write_text(config.replace("@STATUS@", str(self.status_file)))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [KEYSTEWARD, "host", "run", "--config", str(tmp / f"{name}.toml")], stdout=log, stderr=log
            )


@dataclass
class Site:
    server: ServerProcess
    admin: str
    tmp: Path
    guest: GuestImage
    tpms: dict[str, Swtpm]
    registry: SecretRegistry
    root: str

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.server.cli(*args, token=self.admin, check=check)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        with self.server.http(self.admin) as c:
            r = c.request(method, path, json=body)
        assert r.status_code < 300, r.text
        return r.json() if r.content else None

    def cert(self, name: str) -> tuple[str, str]:
        key_pem, csr = x509csr.make_csr("acme", "host", name)
        issued = self.call("POST", "/ca/issue", {"name": name, "role": "host", "csr_pem": csr.decode()})
        cert, key = self.tmp / f"{name}.pem", self.tmp / f"{name}.key"
        cert.write_text(issued["cert_pem"])
        key.write_bytes(bytes(key_pem))
        return str(cert), str(key)

    def host_config(self, name: str) -> str:
        cert, key = self.cert(name)
        return (
            f'state_dir = "{self.tmp}/{name}-run"\nsnapshot_dir = "{self.tmp}/snapshots"\npoll_seconds = 0.2\n'
            f'status_file = "@STATUS@"\n[kms]\nurl = "{self.server.url}"\n'
            f'ca_file = "{self.server.settings.server.tls_ca}"\n'
            f'cert_file = "{cert}"\nkey_file = "{key}"\ngrace_seconds = 2\n[tpm]\ntcti = "{self.tpms[name].tcti}"\n'
            f'pcrs = "sha256:0,7"\n[qemu]\naccel = "tcg"\n'
        )

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(rec["body"]) for rec in self.call("GET", "/audit?limit=1000")["records"]]


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[HostProcess]]:
    """Host agents started by the test: stopped by SIGTERM at the end (each stops its VMs, wipes their keys
    and ends their leases), killed if that hangs; then no QEMU of this test may be left running."""
    started: list[HostProcess] = []
    yield started
    for host in started:
        if host.proc.poll() is None:
            host.proc.send_signal(signal.SIGTERM)
    for host in started:
        try:
            host.proc.wait(30)
        except subprocess.TimeoutExpired:
            host.proc.kill()
            host.proc.wait(10)
    kill_qemus_under(tmp_path)


def kill_qemus_under(root: Path) -> None:
    """SIGKILL every QEMU whose command line names a path under ``root`` (what a test left behind)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(str(root).encode() in arg for arg in argv):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def site(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry,
    guest_image: GuestImage,
) -> Iterator[Site]:  # fmt: skip
    with (
        running_swtpm(tmp_path / "tpm-a", tmp_path / "tpm-ca") as (tpm_a, ca),
        running_swtpm(tmp_path / "tpm-b") as (tpm_b, _),
    ):
        assert ca is not None
        roots = tmp_path / "ek-roots.pem"
        roots.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ca.root, ca.issuer)))
        out = init_manager(tmp_path / "ks", secret_registry)
        server = server_factory(tmp_path / "ks", env={"KEYSTEWARD_RELEASE_TPM_EK_ROOTS": str(roots)})
        with server.http(out.root_token.secret) as c:
            admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
        tpms = {"host-a": tpm_a, "host-b": tpm_b}
        site = Site(server, admin, tmp_path, guest_image, tpms, secret_registry, out.root_token.secret)
        site.call("POST", "/keys", {"name": "volumes"})
        site.call("POST", "/ca/init")
        yield site


def make_vm(site: Site, name: str = "web") -> tuple[Path, bytes]:
    """A VM with one LUKS2 disk of the key manager (break-glass keyslot for the test); (disk, volume key)."""
    disk = site.tmp / f"{name}-root.img"
    create_kms_volume(
        str(disk), KmsVolumeSpec(url=site.server.url, key="volumes", host="host-a", name=f"{name}-root"),
        CreateOptions(size=4 * MIB), admin_token=site.admin, ca_file=str(site.server.settings.server.tls_ca),
        break_glass=bytearray(BREAK_GLASS), break_glass_kdf=KdfChoice(type="pbkdf2", iterations=1000),
    )  # fmt: skip
    key = volume_key(disk)
    site.registry.secret(key, f"volume key of {name}")
    site.cli("vm", "create", name, "--volume", f"{name}-root={disk}", "--key", "volumes", "--memory", "256",
             "--kernel", str(site.guest.kernel), "--initrd", str(site.guest.initrd),
             "--append", guest_append(marker=MARKER), "--lease-seconds", "10", "--renew-seconds", "1")  # fmt: skip
    return disk, key


def start_host(site: Site, hosts: list[HostProcess], name: str) -> HostProcess:
    host = HostProcess(site.tmp, name, site.host_config(name), site.registry)
    hosts.append(host)
    host.wait(lambda s: s.get("host") == name)
    return host


def serial(site: Site, host: str, vm_id: str) -> str:
    """The complete lines of the VM's console log (its last line may be half written)."""
    try:
        text = (site.tmp / f"{host}-run" / run_name(vm_id) / "serial.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[: text.rfind("\n") + 1]


def ticks(site: Site, host: str, vm_id: str, after: int = 0, timeout: float = 90.0) -> list[tuple[int, int, str]]:
    """The guest's tick lines on ``host`` once more than ``after`` of them are there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [(int(a), int(b), c) for a, b, c in TICK.findall(serial(site, host, vm_id))]
        if len(found) > after:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no guest ticks on {host}: {serial(site, host, vm_id)[-2000:]}")


def files_hold(roots: list[Path], needles: dict[str, bytes]) -> set[str]:
    found: set[str] = set()
    for root in roots:
        for path in root.rglob("*") if root.is_dir() else [root]:
            if path.is_file() and not path.is_socket():
                data = path.read_bytes()
                found |= {label for label, needle in needles.items() if needle in data}
    return found


def test_an_attested_host_runs_the_vm_and_its_saved_state_holds_no_plaintext(
    site: Site, hosts: list[HostProcess]
) -> None:
    disk, key = make_vm(site)
    host = start_host(site, hosts, "host-a")
    site.cli("host", "enroll-tpm", "--config", str(site.tmp / "host-a.toml"))
    started = json.loads(site.cli("vm", "start", "web", "--host", "host-a", "--json").stdout)
    assert started["state"] == "done" and started["result"]["accel"] == "tcg", started
    vm_id = started["vm_id"]
    first = ticks(site, "host-a", vm_id, after=2)
    ram = hashlib.md5(MARKER * (MARKER_BYTES // len(MARKER))).hexdigest()  # noqa: S324 - the guest's own checksum
    assert first[-1][2] == ram  # the marker sits in guest RAM
    shown = json.loads(site.cli("vm", "show", "web", "--json").stdout)
    assert shown["host"] == "host-a" and shown["disks"][0]["path"] == str(disk)
    # the volume key is in the host agent (it serves the disk), never in QEMU
    qemu_pid = host.status()["vms"]["web"]["pid"]
    needles = {"volume key": key, "RAM marker": MARKER * 4}
    assert memory_holds(host.proc.pid, {"volume key": key}) == {"volume key"}
    assert "volume key" not in memory_holds(qemu_pid, needles)
    assert "RAM marker" in memory_holds(qemu_pid, needles)  # the control: guest RAM is QEMU's memory

    before = first[-1]  # a tick the guest had made before its state was saved (3 or more)
    saved = json.loads(site.cli("vm", "snapshot", "web", "--json").stdout)["result"]
    snapshot = Path(saved["path"])
    assert snapshot.stat().st_size > 4 * MIB and saved["state_bytes"] > 4 * MIB
    data = snapshot.read_bytes()
    assert data.startswith(b"KSVMSTATE1")
    assert MARKER not in data and key not in data and key[:16] not in data
    at_snapshot = ticks(site, "host-a", vm_id)[-1]
    # nothing keysteward wrote holds the marker or the key
    written = [site.tmp / "snapshots", site.tmp / "host-a-run", site.tmp / "ks", host.log, host.status_file]
    assert files_hold(written, {"RAM marker": MARKER, "volume key": key}) == set()

    site.cli("vm", "stop", "web")
    assert host.proc.poll() is None and host.status()["vms"] == {}
    restored = json.loads(site.cli("vm", "restore", "web", saved["snapshot"], "--host", "host-a", "--json").stdout)
    assert restored["state"] == "done", restored
    after = ticks(site, "host-a", vm_id, after=1)
    _, counter, ram_after = after[-1]
    assert ram_after == ram
    assert after[0][0] > before[0] >= 3  # RAM came back: the tick count goes on (a fresh boot starts at 1)
    assert counter > at_snapshot[1]  # the disk counter continues from the disk
    records = [r["action"] for r in site.audit()]
    assert {"vm.create", "vm.start", "vm.snapshot", "vm.restore", "vm.order"} <= set(records)


def test_a_refused_host_gets_no_key_and_a_second_host_is_a_suspected_clone(
    site: Site, hosts: list[HostProcess]
) -> None:
    _, key = make_vm(site)
    host_a = start_host(site, hosts, "host-a")
    host_b = start_host(site, hosts, "host-b")
    site.cli("host", "enroll-tpm", "--config", str(site.tmp / "host-a.toml"))
    device = TpmDevice(site.tpms["host-b"].tcti, workdir=site.tmp / "tpm-b-work")
    _, ak = device.ensure_keys()
    site.call("PUT", "/attest/tpm/keys", {"instance": "host:host-b", "ak_public": base64.b64encode(ak).decode()})
    # host-b's PCR 7 differs from host-a's: the tenant only runs VMs where PCR 7 is host-a's value
    device.extend(7, "ab" * 32)
    good = TpmDevice(site.tpms["host-a"].tcti, workdir=site.tmp / "tpm-a-work")
    pcr7 = good.quote(b"\x00" * 32, {"sha256": [7]})["pcrs"]["sha256"]["7"]
    policy = site.tmp / "hosts.cedar"
    policy.write_text(
        '@id("vm-hosts-pcr7")\nforbid (principal is Keysteward::Host, action in [Keysteward::Action::"vm_start",'
        ' Keysteward::Action::"vm_restore"], resource is Keysteward::Vm)\nunless { context.platform has pcrs &&'
        f' context.platform.pcrs has sha256_7 && context.platform.pcrs.sha256_7 == "{pcr7}" }};\n'
    )
    site.cli("policy", "set", str(policy))
    refused = site.cli("vm", "start", "web", "--host", "host-b", check=False)
    assert refused.returncode == 1 and "forbidden_by_policy" in refused.stderr and "vm-hosts-pcr7" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert memory_holds(host_b.proc.pid, {"volume key": key}) == set()
    assert not (site.tmp / "host-b-run").exists() or not any((site.tmp / "host-b-run").iterdir())

    started = json.loads(site.cli("vm", "start", "web", "--host", "host-a", "--json").stdout)
    vm_id = started["vm_id"]
    ticks(site, "host-a", vm_id)
    # a second host asks while the first runs it (policy aside: the live lease decides)
    site.cli("policy", "set", str(_open_policy(site)))
    clone = site.cli("vm", "start", "web", "--host", "host-b", check=False)
    assert clone.returncode == 1 and "suspected_clone" in clone.stderr, clone.stderr
    alerts = [r for r in site.audit() if r.get("details", {}).get("alert") == "suspected_clone"]
    assert alerts and alerts[-1]["actor"] == "host:host-b"
    assert memory_holds(host_b.proc.pid, {"volume key": key}) == set()

    # revoked while it runs: the guest stops within a renewal, the key leaves the host agent
    qemu_pid = host_a.status()["vms"]["web"]["pid"]
    assert memory_holds(host_a.proc.pid, {"volume key": key}) == {"volume key"}
    site.cli("vm", "revoke", "web", "--yes")
    host_a.wait(lambda s: s.get("vms") == {}, timeout=15)
    assert not os.path.exists(f"/proc/{qemu_pid}") or _zombie(qemu_pid)
    assert memory_holds(host_a.proc.pid, {"volume key": key}) == set()
    again = site.cli("vm", "start", "web", "--host", "host-a", check=False)
    assert again.returncode == 1 and "volume_revoked" in again.stderr


def _open_policy(site: Site) -> Path:
    path = site.tmp / "open.cedar"
    path.write_text('@id("hosts-any")\npermit (principal is Keysteward::Host, action, resource is Keysteward::Vm);\n')
    return path


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_damaged_or_foreign_state_and_strangers_are_refused_with_nothing_launched(
    site: Site, hosts: list[HostProcess]
) -> None:
    make_vm(site)
    host = start_host(site, hosts, "host-a")
    site.cli("host", "enroll-tpm", "--config", str(site.tmp / "host-a.toml"))
    vm_id = json.loads(site.cli("vm", "start", "web", "--host", "host-a", "--json").stdout)["vm_id"]
    ticks(site, "host-a", vm_id, after=2)
    suspended = json.loads(site.cli("vm", "suspend", "web", "--json").stdout)["result"]
    assert suspended["stopped"] is True and host.status()["vms"] == {}
    path = Path(suspended["path"])
    good = path.read_bytes()

    def refused(code: str, *args: str) -> None:
        done = site.cli(*args, check=False)
        assert done.returncode == 1 and code in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert host.status()["vms"] == {} and not any((site.tmp / "host-a-run").glob("*/qmp.sock"))

    # a flipped byte, a truncated file: refused before QEMU sees a byte (nothing is launched)
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x40
    path.write_bytes(bytes(damaged))
    refused("snapshot_auth_failed", "vm", "resume", "web", "--host", "host-a")
    assert path.read_bytes() == bytes(damaged)  # nothing on disk changed
    path.write_bytes(good[: len(good) - 4096])
    refused("snapshot_auth_failed", "vm", "resume", "web", "--host", "host-a")
    # a snapshot id that is not this VM's, a VM that does not exist
    refused("snapshot_not_found", "vm", "restore", "web", "6f1c7d4e-0000-4000-8000-000000000000", "--host", "host-a")
    refused("vm_not_found", "vm", "start", "nope", "--host", "host-a")
    # the good file again: the VM resumes where it was
    path.write_bytes(good)
    site.cli("vm", "resume", "web", "--host", "host-a")
    assert ticks(site, "host-a", vm_id)[0][0] >= 3

    # a host certificate of another tenant asks for this tenant's VM, or its orders
    evil_admin = _tenant(site, "evil")
    with site.server.http(evil_admin) as c:
        assert c.post("/ca/init").status_code == 201
        key_pem, csr = x509csr.make_csr("evil", "host", "host-a")
        issued = c.post("/ca/issue", json={"name": "host-a", "role": "host", "csr_pem": csr.decode()}).json()
    cert, key = site.tmp / "evil.pem", site.tmp / "evil.key"
    cert.write_text(issued["cert_pem"])
    key.write_bytes(bytes(key_pem))
    with site.server.http(cert=(cert, key)) as evil:
        assert evil.get("/host/orders").json() == []
        body = {"tenant": "acme", "nonce": "x" * 43, "public_key": base64.b64encode(bytes(32)).decode(),
                "evidence": {"identity": {}}, "hardware": {}}  # fmt: skip
        answer = evil.post(f"/vms/{vm_id}/release", json=body)
        assert answer.status_code == 403 and answer.json()["code"] == "tenant_mismatch", answer.text
        answer = evil.post(f"/vms/{vm_id}/release", json={**body, "tenant": "evil"})
        assert answer.status_code == 403 and answer.json()["code"] in ("vm_not_found", "nonce_invalid"), answer.text
        snap = evil.post(f"/vms/{vm_id}/snapshots", json={"lease_id": vm_id, "token": "AAAA", "path": "/tmp/x"})
        assert snap.status_code in (403, 404), snap.text
    assert host.status()["vms"]["web"]["vm_id"] == vm_id  # the VM ran on through all of it

    # crypto-shredding: the VM's key and its disk's key are destroyed; the guest stops at its next renewal
    site.cli("vm", "destroy", "web", "--yes")
    host.wait(lambda s: s.get("vms") == {}, timeout=15)
    refused("volume_destroyed", "vm", "resume", "web", "--host", "host-a")
    with site.server.http(site.admin) as c:
        assert c.get("/volumes/web-root").json()["state"] == "destroyed"


def _tenant(site: Site, name: str) -> str:
    with site.server.http(site.root) as c:
        return str(c.post("/tenants", json={"name": name}).json()["admin_token"]["token"])
