"""Issue 11 item 10 against real server processes: data-dir modes, /metrics access, cache and HSTS
headers, TLS 1.2 suites (checked with openssl s_client and Python's ssl), no state change while sealed."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from keysteward.settings import load
from tests.fixtures.keysteward import KEYSTEWARD, SecretRegistry, ServerProcess, free_port, init_manager

pytestmark = pytest.mark.e2e


def modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(root: Path) -> None:
    for name, mode in modes(root).items():
        want = 0o700 if (root / name).is_dir() else 0o600
        assert mode == want, f"{name} is {oct(mode)}, want {oct(want)}"


def test_init_into_an_open_directory_makes_it_private(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    data = tmp_path / "ks"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # noqa: S103 - the loose mode under test
    secret_registry.place(data)
    args = ["server", "init", "--data-dir", str(data), "--seal", "dev", "--insecure-dev-seal", "--json"]
    result = subprocess.run(
        [KEYSTEWARD, *args, "--listen-port", str(free_port())],
        capture_output=True,
        text=True,
        umask=0o022,  # the usual umask: without the fix every file is world-readable
        timeout=120,
        check=True,
    )
    assert '"root_token"' in result.stdout
    names = set(modes(data))
    assert {"keysteward.db", "keysteward.toml", "dev-unseal.key", "tls/server.key", "tls/ca.pem"} <= names
    assert_private(data)
    # a restore or an editor loosened modes: start repairs them; SQLite's WAL files follow the database
    os.chmod(data / "keysteward.db", 0o644)
    os.chmod(data, 0o755)  # noqa: S103 - the loose mode under test
    server = server_factory(data, start=False)
    server.settings = load(data, env={})
    server.start()
    with server.http() as c:
        assert c.get("/health").status_code == 200
    time.sleep(0.3)
    assert (data / "keysteward.db-wal").exists()
    assert_private(data)


def test_metrics_need_loopback_or_a_system_token_and_name_no_tenant(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    env = {"KEYSTEWARD_SERVER_LISTEN_HOST": "0.0.0.0"}  # noqa: S104 - reachable from eth0 for the test
    server = server_factory(tmp_path / "ks", env=env)
    root = out.root_token.secret
    ctx = ssl.create_default_context(cafile=server.settings.server.tls_ca)
    ctx.check_hostname = False  # the certificate names loopback; this test reaches it on the host's own address
    outside = f"https://192.0.2.2:{server.settings.server.listen_port}"
    with server.http(root) as c:
        admin = c.post("/tenants", json={"name": "secretcorp"}).json()["admin_token"]["token"]
    with server.http(admin) as c:
        c.post("/keys", json={"name": "secretcorp-key"})
        c.get("/keys/secretcorp-key")
        c.get("/no-such-route/secretcorp")
    with httpx.Client(base_url=outside, verify=ctx, timeout=30) as far:
        assert far.get("/v1/health").status_code == 200  # the address is reachable
        anonymous = far.get("/metrics")
        assert anonymous.status_code == 401 and "keysteward_http" not in anonymous.text
        tenant_admin = far.get("/metrics", headers={"authorization": f"Bearer {admin}"})
        assert tenant_admin.status_code == 403
        text = far.get("/metrics", headers={"authorization": f"Bearer {root}"}).text
    assert "keysteward_http_requests_total" in text and "secretcorp" not in text
    with httpx.Client(base_url=server.url, verify=ctx, timeout=30) as near:
        assert near.get("/metrics").status_code == 200
    server.stop()
    strict = server_factory(tmp_path / "ks", env={"KEYSTEWARD_SERVER_METRICS_ACCESS": "token"})
    with httpx.Client(base_url=strict.url, verify=ctx, timeout=30) as near:
        assert near.get("/metrics").status_code == 401
        assert near.get("/metrics", headers={"authorization": f"Bearer {root}"}).status_code == 200


def test_every_answer_is_no_store_and_hsts(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    with server.http(out.root_token.secret) as c:
        answers = [
            c.post("/tenants", json={"name": "acme"}),  # carries a token
            c.get("/sys/status"),
            c.get("/nowhere"),
            c.post("/tenants", content=b"x" * 70_000, headers={"content-type": "application/json"}),
        ]
        admin = answers[0].json()["admin_token"]["token"]
        c.headers["authorization"] = f"Bearer {admin}"
        c.post("/keys", json={"name": "k"})
        answers.append(c.post("/keys/k/generate-data-key", json={}))  # carries a key
        secret_registry.b64(answers[-1].json()["plaintext"], "hygiene data key")
    assert [a.status_code for a in answers] == [201, 200, 404, 413, 200]
    for a in answers:
        assert a.headers["cache-control"] == "no-store", a.request.url
        assert a.headers["strict-transport-security"].startswith("max-age="), a.request.url


TLS12_PROBES = {
    # refused: CBC, static RSA key transport, finite-field DHE
    "ECDHE-ECDSA-AES128-SHA256": False,
    "ECDHE-ECDSA-AES256-SHA384": False,
    "ECDHE-ECDSA-AES128-SHA": False,
    "AES128-GCM-SHA256": False,
    "DHE-RSA-AES128-GCM-SHA256": False,
    # offered: ECDHE with an AEAD
    "ECDHE-ECDSA-AES128-GCM-SHA256": True,
    "ECDHE-ECDSA-AES256-GCM-SHA384": True,
    "ECDHE-ECDSA-CHACHA20-POLY1305": True,
}


def test_tls12_offers_only_aead_forward_secret_suites(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    port = server.settings.server.listen_port
    for cipher, offered in TLS12_PROBES.items():
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-cipher", cipher],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
        )
        agreed = result.returncode == 0 and f"Cipher is {cipher}" in result.stdout
        assert agreed == offered, (cipher, result.stdout[-500:], result.stderr[-500:])
    # and Python's ssl offering every TLS 1.2 suite its OpenSSL has, one at a time
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    probe.set_ciphers("ALL:@SECLEVEL=0")
    accepted = []
    for suite in {c["name"] for c in probe.get_ciphers() if c["protocol"] == "TLSv1.2"}:
        one = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        one.check_hostname, one.verify_mode = False, ssl.CERT_NONE
        one.maximum_version = ssl.TLSVersion.TLSv1_2
        one.set_ciphers(f"{suite}:@SECLEVEL=0")
        try:
            with one.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as s:
                accepted.append(s.cipher()[0])
        except (ssl.SSLError, ConnectionError):
            continue
    assert accepted, "no TLS 1.2 suite at all"
    for suite in accepted:
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite), accepted


def test_a_sealed_server_refuses_changes_it_could_not_sign(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry, seal="shamir")
    server = server_factory(tmp_path / "ks")
    root = out.root_token.secret
    with server.http(root) as c:
        for method, path, body in (
            ("POST", "/tenants", {"name": "acme"}),
            ("POST", "/tokens", {"name": "ops", "role": "admin"}),
            ("DELETE", "/tokens/abc", None),
            ("PUT", "/policy", {}),
        ):
            r = c.request(method, path, json=body)
            assert r.status_code == 503 and r.json()["code"] == "sealed", (method, path, r.text)
            assert "audit" in r.json()["detail"]
        assert c.get("/tenants").status_code == 200  # reading is fine
        assert [t["name"] for t in c.get("/tenants").json()] == ["system"]
        for share in out.result.shares[:3]:
            c.post("/sys/unseal", json={"share": share})
        assert c.post("/tenants", json={"name": "acme"}).status_code == 201
