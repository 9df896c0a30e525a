"""The agent end to end: a real key manager process over TLS, a devcloud metadata service, real volumes.

- a bound volume is created (registration + LUKS2 keyslot + token), released through ``kms_passphrase``
  and ``keysteward agent unlock``; an instance outside the binding is denied;
- ``agent run``: revocation closes the volume and wipes the keys, which a scan of the agent's memory
  (``/proc/PID/mem``) proves: the volume key is there while the volume is open, gone after;
- ``shred`` removes keyslot and token: cryptsetup no longer opens the volume with the old secret, the
  break-glass passphrase still does;
- the key manager stopped: grace null keeps the volume open until the lease expires, grace 0 locks it
  at the first failed renewal; the agent unlocks again once the key manager is back;
- SIGTERM locks the volumes and ends the leases cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from keysteward.agent.kms_volume import KmsVolumeSpec, create_kms_volume, kms_passphrase
from keysteward.agent.unlock import UnlockOptions
from keysteward.devcloud.provider import DevCloud, Instance
from keysteward.devcloud.server import MetadataServer
from keysteward.errors import Denied
from keysteward.volume.create import CreateOptions
from keysteward.volume.errors import VolumeRequestError
from keysteward.volume.kdf import KdfChoice
from keysteward.volume.kms_token import read_token
from keysteward.volume.luks_volume import LuksVolume
from tests.fixtures.keysteward import KEYSTEWARD, SecretRegistry, ServerProcess, init_manager
from tests.integration.test_volume_tools import MIB, run, tool
from tests.support.daemons import Daemon, memory_holds, reaped

pytestmark = pytest.mark.e2e
ACCOUNT = "111122223333"
BREAK_GLASS = b"correct horse battery staple"


@dataclass
class Kms:
    server: ServerProcess
    admin: str
    cloud: DevCloud
    metadata: MetadataServer
    registry: SecretRegistry
    tmp: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ca(self) -> str:
        return str(self.server.settings.server.tls_ca)

    def instance(self) -> tuple[Instance, str]:
        vm = self.cloud.create(account=ACCOUNT, image_id="img-base")
        return vm, f"{self.metadata.url}/{vm.id}"

    def options(self, metadata_url: str) -> UnlockOptions:
        return UnlockOptions(metadata_url=metadata_url, ca_file=self.ca, timeout=5.0)

    def volume(self, name: str, vm: Instance, **spec: Any) -> tuple[Path, dict[str, Any]]:
        path = self.tmp / f"{name}.img"
        made = create_kms_volume(
            str(path),
            KmsVolumeSpec(
                url=self.url, key="volumes", provider="devcloud", account=ACCOUNT, instance_id=vm.id, name=name, **spec
            ),
            CreateOptions(size=4 * MIB),
            admin_token=self.admin,
            ca_file=self.ca,
            break_glass=bytearray(BREAK_GLASS),
            break_glass_kdf=KdfChoice(type="pbkdf2", iterations=1000),
        )
        return path, made

    def secret_of(self, path: Path, metadata_url: str) -> bytes:
        """The volume's secret, released the way ``volume read --kms`` gets it (the lease ends after)."""
        with kms_passphrase(str(path), self.options(metadata_url)) as secret:
            value = bytes(secret)
        self.registry.secret(value, "volume secret")
        return value

    def admin_post(self, path: str, body: dict[str, Any]) -> Any:
        with self.server.http(self.admin) as c:
            r = c.post(path, json=body)
        assert r.status_code < 300, r.text
        return r.json() if r.content else None

    def leases(self, volume_id: str) -> list[dict[str, Any]]:
        with self.server.http(self.admin) as c:
            r = c.get("/leases", params={"volume": volume_id})
        assert r.status_code == 200, r.text
        return list(r.json())


@pytest.fixture
def kms(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> Iterator[Kms]:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    cloud = DevCloud.init(tmp_path / "devcloud")
    metadata = MetadataServer(cloud, "127.0.0.1", 0)
    thread = threading.Thread(target=metadata.serve_forever, daemon=True)
    thread.start()
    world = Kms(server, admin, cloud, metadata, secret_registry, tmp_path)
    world.admin_post("/keys", {"name": "volumes"})
    world.admin_post("/providers", {"name": "devcloud", "kind": "aws-iid", "certificates_pem": cloud.certificate_pem()})
    yield world
    metadata.shutdown()
    metadata.server_close()


# -- helpers ----------------------------------------------------------------------------------------


class AgentProcess(Daemon):
    name = "agent"

    def __init__(self, kms: Kms, lines: list[str]) -> None:
        self.config = kms.tmp / "volumes"
        self.config.write_text("# test volumes\n" + "\n".join(lines) + "\n")
        self.status_file = kms.tmp / "run" / "agent.json"
        self.log = kms.tmp / f"agent-{time.monotonic_ns()}.log"
        kms.registry.place(self.log)
        kms.registry.place(self.status_file.parent)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [KEYSTEWARD, "agent", "run", "--config", str(self.config), "--status-file", str(self.status_file),
                 "--ca-file", kms.ca, "--log-level", "debug"],
                stdout=log, stderr=log,
            )  # fmt: skip


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    yield from reaped([])


def volume_key(path: Path) -> bytes:
    with LuksVolume.open(str(path), BREAK_GLASS) as vol:
        return vol.export_volume_key()


def opens_with(path: Path, secret: bytes) -> bool:
    cryptsetup = tool("cryptsetup", "cryptsetup-bin")
    return run([cryptsetup, "open", "--test-passphrase", "--key-file=-", str(path)], input=secret,
               check=False).returncode == 0  # fmt: skip


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# -- tests ------------------------------------------------------------------------------------------


def test_create_release_and_one_shot_unlock(kms: Kms, tmp_path: Path) -> None:
    vm, md = kms.instance()
    path, made = kms.volume("data1", vm, labels={"env": "test"}, lease_seconds=30, renew_seconds=10)
    volume_id = made["volume"]["id"]
    assert made["kms_keyslot"] == 0 and made["break_glass_keyslot"] == 1
    assert made["volume"]["labels"] == {"env": "test"} and made["volume"]["name"] == "data1"
    token = read_token(str(path))
    assert (token.ref.url, token.ref.tenant, token.ref.volume_id, token.ref.key) == (
        kms.url,
        "acme",
        volume_id,
        "volumes",
    )
    secret = kms.secret_of(path, md)
    assert len(secret) == 32 and opens_with(path, secret)
    assert [lease["state"] for lease in kms.leases(volume_id)] == ["ended"]  # --kms ends its lease

    started = time.monotonic()
    done = subprocess.run(
        [KEYSTEWARD, "agent", "unlock", str(path), "--metadata", md, "--ca-file", kms.ca, "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["volumes"][0]
    assert result["ok"] and result["state"] == "checked" and result["mode"] == "userspace"  # no device-mapper here
    assert result["volume_id"] == volume_id and result["keyslot"] == 0
    assert elapsed < 5, elapsed  # the boot figure (under 400 ms) is measured by bench/, this guards regressions
    states = sorted(lease["state"] for lease in kms.leases(volume_id))
    assert states == ["ended", "ended"]

    # an instance outside the volume's binding is denied with the server's reason; nothing opens
    _, other_md = kms.instance()
    with pytest.raises(Denied) as caught:
        kms.secret_of(path, other_md)
    assert caught.value.code == "not_bound"
    denied = subprocess.run(
        [KEYSTEWARD, "agent", "unlock", str(path), "--metadata", other_md, "--ca-file", kms.ca],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert denied.returncode == 1 and "(not_bound)" in denied.stderr and "Traceback" not in denied.stderr

    # a volume that cannot be created after registering leaves no registration behind
    (tmp_path / "dir.img").mkdir()
    with pytest.raises(VolumeRequestError) as failed:
        kms.volume("dir", vm)
    assert "was destroyed" in failed.value.message
    with kms.server.http(kms.admin) as c:
        states = {v["name"]: v["state"] for v in c.get("/volumes").json()}
    assert states["dir"] == "destroyed" and states["data1"] == "active"


def test_revoke_closes_and_wipes(kms: Kms, agents: list[AgentProcess]) -> None:
    vm, md = kms.instance()
    path, made = kms.volume("data1", vm, lease_seconds=20, renew_seconds=1)
    secret, key = kms.secret_of(path, md), volume_key(path)
    kms.registry.secret(key, "volume key")
    agent = AgentProcess(kms, [f"data1 {path} metadata={md},mode=userspace"])
    agents.append(agent)
    status = agent.wait(lambda s: s["volumes"]["data1"]["state"] == "open")
    entry = status["volumes"]["data1"]
    assert entry["volume_id"] == made["volume"]["id"] and entry["mode"] == "userspace" and entry["lease_id"]
    agent.wait(lambda s: s["volumes"]["data1"]["last_action"] == "renew")
    needles = {"secret": secret, "volume key": key}
    assert memory_holds(agent.proc.pid, needles) >= {"volume key"}  # the scan finds what is there

    kms.admin_post(f"/volumes/{made['volume']['id']}/revoke", {"shred": False, "reason": "test"})
    status = agent.wait(lambda s: s["volumes"]["data1"]["state"] == "locked", timeout=10)
    assert status["volumes"]["data1"]["reason"] == "revoked"
    assert status["volumes"]["data1"]["lease_expires_at"] is None
    shown = subprocess.run([KEYSTEWARD, "agent", "status", "--status-file", str(agent.status_file)],
                           capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
    assert "data1: state=locked reason=revoked" in shown, shown
    assert "HTTP Request" not in agent.log.read_text()  # httpx's INFO lines (with URLs) stay out of the log
    assert memory_holds(agent.proc.pid, needles) == set()
    text = agent.status_file.read_text() + agent.log.read_text()
    assert secret.hex() not in text and key.hex() not in text
    assert opens_with(path, secret)  # revoke without shred leaves the header alone
    assert agent.stop() == 0


def test_shred_removes_keyslot_and_token(kms: Kms, agents: list[AgentProcess]) -> None:
    vm, md = kms.instance()
    path, made = kms.volume("data1", vm, lease_seconds=20, renew_seconds=1)
    secret = kms.secret_of(path, md)
    agent = AgentProcess(kms, [f"data1 {path} metadata={md}"])
    agents.append(agent)
    agent.wait(lambda s: s["volumes"]["data1"]["state"] == "open")
    kms.admin_post(f"/volumes/{made['volume']['id']}/revoke", {"shred": True, "reason": "stolen snapshot"})
    status = agent.wait(lambda s: s["volumes"]["data1"]["state"] == "shredded", timeout=10)
    assert status["volumes"]["data1"]["last_action"] == "shred"
    with pytest.raises(VolumeRequestError) as caught:
        read_token(str(path))
    assert caught.value.code == "kms_token_missing"
    assert not opens_with(path, secret)
    assert opens_with(path, BREAK_GLASS)
    assert agent.stop() == 0


def test_destroying_the_key_shreds_the_open_volume(kms: Kms, agents: list[AgentProcess]) -> None:
    """Issue 11 item 2 with a real agent: the tenant crypto-shreds the key; the agent holding the volume open
    hears ``shred`` at its next renewal, closes it and removes the keyslot (before: ``continue`` forever)."""
    vm, md = kms.instance()
    path, made = kms.volume("data1", vm, lease_seconds=20, renew_seconds=1)
    secret = kms.secret_of(path, md)
    agent = AgentProcess(kms, [f"data1 {path} metadata={md}"])
    agents.append(agent)
    agent.wait(lambda s: s["volumes"]["data1"]["state"] == "open")
    kms.admin_post("/keys/volumes/destroy", {})
    status = agent.wait(lambda s: s["volumes"]["data1"]["state"] == "shredded", timeout=10)
    assert status["volumes"]["data1"]["last_action"] == "shred"
    assert not opens_with(path, secret) and opens_with(path, BREAK_GLASS)
    with kms.server.http(kms.admin) as c:
        assert c.get(f"/volumes/{made['volume']['id']}").json()["state"] == "destroyed"
    assert agent.stop() == 0


def test_unreachable_key_manager_grace(kms: Kms, agents: list[AgentProcess]) -> None:
    vm, md = kms.instance()
    keep, _ = kms.volume("keep", vm, lease_seconds=8, renew_seconds=1)  # grace null: until the lease expires
    strict, _ = kms.volume("strict", vm, lease_seconds=8, renew_seconds=1, grace_seconds=0)
    agent = AgentProcess(kms, [f"keep {keep} metadata={md}", f"strict {strict} metadata={md},timeout=2"])
    agents.append(agent)
    agent.wait(lambda s: all(v["state"] == "open" and v["last_action"] == "renew" for v in s["volumes"].values()))
    expiry = _ts(agent.status()["volumes"]["keep"]["lease_expires_at"])
    stopped = time.time()
    kms.server.stop()
    # grace 0: locked at the first failed renewal, within a renewal period or so
    status = agent.wait(lambda s: s["volumes"]["strict"]["state"] == "locked", timeout=10)
    assert status["volumes"]["strict"]["reason"] == "kms_unreachable"
    assert time.time() - stopped < 5
    assert status["volumes"]["keep"]["state"] == "open"
    assert status["volumes"]["keep"]["last_error"] == "kms_unreachable"
    # grace null: open until the lease's expiry, then locked
    status = agent.wait(lambda s: s["volumes"]["keep"]["state"] == "locked", timeout=20)
    locked_at = time.time()
    assert status["volumes"]["keep"]["reason"] == "kms_unreachable"
    assert expiry - 0.5 <= locked_at <= expiry + 3, (expiry, locked_at)
    # the key manager back: fresh releases, both open again
    kms.server.start()
    agent.wait(lambda s: all(v["state"] == "open" for v in s["volumes"].values()), timeout=30)
    assert agent.stop() == 0


def test_sigterm_locks_and_ends_leases(kms: Kms, agents: list[AgentProcess]) -> None:
    vm, md = kms.instance()
    path, made = kms.volume("data1", vm, lease_seconds=30, renew_seconds=5)
    agent = AgentProcess(kms, [f"data1 {path} metadata={md}"])
    agents.append(agent)
    status = agent.wait(lambda s: s["volumes"]["data1"]["state"] == "open")
    lease_id = status["volumes"]["data1"]["lease_id"]
    assert agent.stop() == 0
    status = agent.status()
    assert status["volumes"]["data1"]["state"] == "locked" and status["volumes"]["data1"]["reason"] == "stopped"
    assert {lease["id"]: lease["state"] for lease in kms.leases(made["volume"]["id"])}[lease_id] == "ended"
    log = agent.log.read_text()
    assert "event=unlocked volume=data1" in log and "event=locked volume=data1 reason=stopped" in log
    # another instance may take the volume at once: no suspected clone
    assert os.path.exists(path)


def test_volume_cli_finds_the_key_manager_in_the_token(kms: Kms, tmp_path: Path) -> None:
    """``volume create --url --key-name --kms-label`` binds a volume; ``volume write/read/check`` without
    ``--url`` or a passphrase get its key by a release from the URL in its token; the old ``--kms``,
    ``--key`` and ``--tag`` still work; a volume with no token asks for a passphrase file."""
    vm, md = kms.instance()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTEWARD_")}
    env |= {"KEYSTEWARD_TOKEN": kms.admin, "KEYSTEWARD_CA_FILE": kms.ca, "KEYSTEWARD_METADATA_URL": md}

    def volume(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([KEYSTEWARD, "volume", *args], env=env, input=input, capture_output=True, timeout=60,
                              check=False)  # fmt: skip

    path = tmp_path / "cli.img"
    made = volume("create", str(path), "--size", "4M", "--url", kms.url, "--key-name", "volumes", "--provider",
                  "devcloud", "--bind-account", ACCOUNT, "--bind-instance", vm.id, "--kms-label", "env=test",
                  "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["volume"]["labels"] == {"env": "test"}
    old = tmp_path / "old.img"
    made_old = volume("create", str(old), "--size", "4M", "--kms", kms.url, "--key", "volumes", "--provider",
                      "devcloud", "--bind-account", ACCOUNT, "--tag", "env=old", "--json")  # fmt: skip
    assert made_old.returncode == 0, made_old.stderr
    assert json.loads(made_old.stdout)["volume"]["labels"] == {"env": "old"}

    written = volume("write", str(path), "--offset", "512", input=b"bound by token")
    assert written.returncode == 0, written.stderr
    read = volume("read", str(path), "--offset", "512", "--length", "14")
    assert read.returncode == 0 and read.stdout == b"bound by token", read.stderr
    assert volume("check", str(path), "--kms", kms.url).returncode == 0
    refused = volume("check", str(path), "--url", "https://127.0.0.1:9")
    assert refused.returncode == 1 and b"127.0.0.1:9" in refused.stderr  # --url wins over the token's URL
    both = volume("check", str(path), "--url", kms.url, "--passphrase-file", "-", input=b"x")
    assert both.returncode == 1 and b"not both" in both.stderr

    plain, pw = tmp_path / "plain.img", tmp_path / "pw"
    pw.write_bytes(b"plain passphrase")
    assert volume("create", str(plain), "--size", "4M", "--passphrase-file", str(pw), "--pbkdf", "pbkdf2",
                  "--pbkdf-force-iterations", "1000").returncode == 0  # fmt: skip
    no_token = volume("read", str(plain), "--length", "1")
    assert no_token.returncode == 1 and b"give --passphrase-file FILE" in no_token.stderr
    stray = volume("create", str(tmp_path / "x.img"), "--size", "4M", "--provider", "devcloud")
    assert stray.returncode == 1 and b"--key-name" in stray.stderr and not (tmp_path / "x.img").exists()
