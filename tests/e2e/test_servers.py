"""Real server processes: mTLS machine identities, a kill during rotation, two servers on one PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keysteward.identity.principal import Principal
from keysteward.server.run import build_services
from keysteward.settings import load
from tests.fixtures.keysteward import KEYSTEWARD, SecretRegistry, ServerProcess, free_port, init_manager
from tests.support.workers import wait_all_serving

pytestmark = pytest.mark.e2e


def bootstrap(server: ServerProcess, root_token: str) -> str:
    with server.http(root_token) as c:
        return str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])


def test_agent_authenticates_with_a_tenant_certificate(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    admin = bootstrap(server, out.root_token.secret)
    server.cli("ca", "init", token=admin)
    issued = server.cli_json(
        "ca", "issue", "web-1", "--role", "agent", "--out-dir", str(tmp_path / "web-1"), token=admin
    )
    assert oct(Path(issued["key"]).stat().st_mode)[-3:] == "600"
    cert = (Path(issued["cert"]), Path(issued["key"]))
    time.sleep(0.2)
    with server.http(admin) as c:
        assert c.post("/keys", json={"name": "vol-keys"}).status_code == 201
    with server.http(cert=cert) as agent:
        assert agent.get("/whoami").json() == {"tenant": "acme", "role": "agent", "name": "web-1", "kind": "cert"}
        # machines release volumes; they use envelope keys only where the tenant's policy names them
        refused = agent.post("/keys/vol-keys/generate-data-key", json={})
        assert refused.status_code == 403 and refused.json()["code"] == "no_permit"
    with server.http(admin) as c:
        pair = c.post("/keys/vol-keys/generate-data-key", json={}).json()
        secret_registry.b64(pair["plaintext"], "admin data key")
    with server.http(cert=cert) as agent:
        refused = agent.post("/decrypt", json={"ciphertext": pair["ciphertext"]})
        assert refused.status_code == 403 and refused.json()["code"] == "no_permit"
        # machines use keys; they do not manage them
        denied = agent.post("/keys", json={"name": "mine"})
        assert denied.status_code == 403 and denied.json()["code"] == "role_forbidden"
    # a certificate from another tenant's CA that claims acme is refused by the app
    with server.http(out.root_token.secret) as c:
        beta_admin = c.post("/tenants", json={"name": "beta"}).json()["admin_token"]["token"]
    server.cli("ca", "init", token=beta_admin)
    time.sleep(0.2)
    beta = server.cli_json(
        "ca", "issue", "web-1", "--role", "agent", "--out-dir", str(tmp_path / "beta"), token=beta_admin
    )
    with server.http(cert=(Path(beta["cert"]), Path(beta["key"]))) as other:
        assert other.get("/whoami").json()["tenant"] == "beta"
        r = other.post("/decrypt", json={"ciphertext": pair["ciphertext"]})
        assert r.status_code == 400 and r.json()["code"] == "invalid_ciphertext"


def test_kill_during_rotation_resumes(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    slow = {
        "KEYSTEWARD_REWRAP_BATCH_SIZE": "25",
        "KEYSTEWARD_REWRAP_INTERVAL": "0.15",
        "KEYSTEWARD_REWRAP_LEASE_SECONDS": "2",
        "KEYSTEWARD_REWRAP_POLL_SECONDS": "0.2",
    }
    server = server_factory(tmp_path / "ks", env=slow)
    admin = bootstrap(server, out.root_token.secret)
    with server.http(admin) as c:
        c.post("/keys", json={"name": "vols"})
        for i in range(300):
            assert c.post("/keys/vols/data-keys", json={"name": f"v{i}"}).status_code == 201
        c.post("/keys/vols/rotate")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rotation = c.get("/keys/vols").json()["rotation"]
            if rotation["rewrapped"] >= 50:
                break
            time.sleep(0.05)
    server.kill()  # SIGKILL in the middle of the rewrap
    assert 0 < rotation["rewrapped"] < 300, rotation
    svc = build_services(load(tmp_path / "ks", env={}))
    try:
        # the interrupted state: some DEKs on v1, some on v2, and every one of them unwraps
        who = svc.tenants.get("acme")
        deks = svc.keys.data.listing(Principal(who.id, "acme", "admin", "admin", "token"), "vols")
        assert {d.kek_version for d in deks} == {1, 2}
        plain = {}
        for d in deks:
            with svc.keys.data.unwrap(who.id, d.id) as buf:
                plain[d.id] = buf.bytes()
                secret_registry.secret(buf.view(), "stored DEK")
    finally:
        svc.close()
    restarted = server_factory(tmp_path / "ks", env=slow)
    with restarted.http(admin) as c:
        deadline = time.monotonic() + 60
        while c.get("/keys/vols").json()["rotation"]["state"] != "done":
            assert time.monotonic() < deadline, "rewrap did not resume"
            time.sleep(0.2)
        versions = {v["version"]: v["data_keys"] for v in c.get("/keys/vols").json()["versions"]}
    assert versions == {1: 0, 2: 300}
    restarted.stop()
    svc = build_services(load(tmp_path / "ks", env={}))
    try:
        for dek_id, value in plain.items():
            with svc.keys.data.unwrap(who.id, dek_id) as buf:
                assert buf.bytes() == value
    finally:
        svc.close()


def test_two_servers_share_one_postgresql(
    tmp_path: Path, pg_url: str, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "a", secret_registry, db_url=pg_url)
    a = server_factory(tmp_path / "a")
    # server b: its own data dir and port, the same database and the same (dev) unseal key file
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    text = (tmp_path / "a" / "keysteward.toml").read_text()
    port_a = str(a.settings.server.listen_port)
    port_b = str(free_port())
    (b_dir / "keysteward.toml").write_text(text.replace(f"listen_port = {port_a}", f"listen_port = {port_b}"))
    b = server_factory(b_dir)
    admin = bootstrap(a, out.root_token.secret)
    with a.http(admin) as c:
        c.post("/keys", json={"name": "shared"})
    errors: list[str] = []
    created: list[str] = []

    def hammer(server: ServerProcess, n: int) -> None:
        with server.http(admin) as c:
            for i in range(n):
                r = c.post("/keys/shared/rotate")
                if r.status_code != 200:
                    errors.append(r.text)
                r = c.post("/keys", json={"name": f"race-{i}"})
                if r.status_code == 201:
                    created.append(r.json()["id"])
                elif r.json().get("code") != "key_exists":
                    errors.append(r.text)

    threads = [threading.Thread(target=hammer, args=(s, 12)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with b.http(admin) as c:
        key = c.get("/keys/shared").json()
        names = sorted(k["name"] for k in c.get("/keys").json())
        audit = c.get("/audit", params={"limit": 5000}).json()
    # no lost rotation: 4 threads x 12 rotations on top of version 1, every version distinct
    assert [v["version"] for v in key["versions"]] == list(range(1, 50)) and key["primary_version"] == 49
    # no duplicate keys: each name created exactly once across both servers
    assert names == sorted(["shared"] + [f"race-{i}" for i in range(12)]) and len(created) == 12
    seqs = [r["seq"] for r in audit["records"]]
    assert seqs == list(range(1, len(seqs) + 1))
    verify = a.cli("audit", "verify", "--json", token=admin)
    assert json.loads(verify.stdout)["ok"] is True
    assert "--public-key" in verify.stderr  # trusting the server's own key is said, on stderr
    # a key disabled, and a token revoked, on one server stop working on the other within a second
    with a.http(admin) as ca, b.http(admin) as cb:
        ct = cb.post("/keys/shared/encrypt", json={"plaintext": "aGVsbG8="}).json()["ciphertext"]
        assert cb.post("/decrypt", json={"ciphertext": ct}).status_code == 200
        officer = ca.post("/tokens", json={"name": "o1", "role": "auditor"}).json()
        with b.http(officer["token"]) as co:
            assert co.get("/keys").status_code == 200
            assert ca.post("/keys/shared/disable").status_code == 200
            assert ca.delete(f"/tokens/{officer['id']}").status_code == 204
            time.sleep(1.2)
            assert cb.post("/decrypt", json={"ciphertext": ct}).json()["code"] == "key_disabled"
            assert co.get("/keys").json()["code"] == "bad_token"


def test_workers_share_a_socket_and_seal_together(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks", env={"KEYSTEWARD_SERVER_WORKERS": "2"})
    admin = bootstrap(server, out.root_token.secret)
    with server.http(admin) as c:
        c.post("/keys", json={"name": "k"})
        ct = c.post("/keys/k/encrypt", json={"plaintext": "aGVsbG8="}).json()["ciphertext"]
    wait_all_serving(server)
    processes = set()
    held = [server.http(admin) for _ in range(8)]
    try:
        for c in held:  # connections held open land on both workers (the one holding the fewest takes the next)
            assert c.post("/decrypt", json={"ciphertext": ct}).status_code == 200
            processes.add(c.get("/health").json()["process"])
    finally:
        for c in held:
            c.close()
    assert len(processes) == 2
    with server.http(out.root_token.secret) as c:
        assert c.post("/sys/seal").json()["sealed"] is True
    time.sleep(0.5)
    sealed_in = set()
    for _ in range(60):  # every worker is sealed now, whichever one took the seal request
        with server.http(admin) as c:
            health = c.get("/health").json()
            assert health["sealed"] is True
            sealed_in.add(health["process"])
            assert c.post("/decrypt", json={"ciphertext": ct}).json()["code"] == "sealed"
    assert sealed_in == processes


def test_workers_refuse_shamir(tmp_path: Path, secret_registry: SecretRegistry) -> None:
    init_manager(tmp_path / "ks", secret_registry, seal="shamir")
    env = {**os.environ, "KEYSTEWARD_DATA_DIR": str(tmp_path / "ks"), "KEYSTEWARD_SERVER_WORKERS": "2"}
    result = subprocess.run([KEYSTEWARD, "server", "start"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "workers_need_auto_unseal" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "setting", "workers"),
    [("KEYSTEWARD_KMIP_LISTEN", "kmip.listen", "1"), ("KEYSTEWARD_KMIP_LISTEN", "kmip.listen", "2"),
     ("KEYSTEWARD_XKS_LISTEN", "xks.listen", "1"), ("KEYSTEWARD_XKS_LISTEN", "xks.listen", "2")],
)  # fmt: skip
def test_a_bad_listen_address_stops_the_start_and_names_its_setting(
    tmp_path: Path, secret_registry: SecretRegistry, variable: str, setting: str, workers: str
) -> None:
    init_manager(tmp_path / "ks", secret_registry)
    env = {**os.environ, "KEYSTEWARD_DATA_DIR": str(tmp_path / "ks"), "KEYSTEWARD_SERVER_WORKERS": workers,
           "KEYSTEWARD_SERVER_LISTEN_PORT": str(free_port()), variable: "127.0.0.1:5696x"}  # fmt: skip
    result = subprocess.run([KEYSTEWARD, "server", "start"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"setting {setting} must be HOST:PORT" in result.stderr and "bad_setting" in result.stderr
    assert "Traceback" not in result.stderr
