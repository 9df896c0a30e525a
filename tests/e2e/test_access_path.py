"""The one access path against a real server process: key uses decided by the tenant's policy, machine
identities without default key use, and certificates issued only from CSRs the machine made."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keysteward.agent.client import AgentClient
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager

pytestmark = pytest.mark.e2e

APP_ONLY = """
@id("orders-app-only")
permit (
  principal == Keysteward::Agent::"acme/orders-app",
  action in [Keysteward::Action::"encrypt", Keysteward::Action::"decrypt",
             Keysteward::Action::"generate_data_key"],
  resource == Keysteward::Key::"acme/orders"
);
@id("admins-manage")
permit (principal is Keysteward::Human, action in [Keysteward::Action::"volume_create",
        Keysteward::Action::"volume_destroy", Keysteward::Action::"policy_update"], resource)
when { principal.role == "admin" };
"""

DECRYPT_FROM_10_ONLY = """
@id("decrypt-only-from-10")
forbid (principal, action == Keysteward::Action::"decrypt", resource)
unless { context.request has source_ip && context.request.source_ip.isInRange(ip("10.0.0.0/8")) };
"""


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> tuple:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    server.cli("ca", "init", token=admin)
    with server.http(admin) as c:
        assert c.post("/keys", json={"name": "orders"}).status_code == 201
        people = {
            role: c.post("/tokens", json={"name": f"p-{role}", "role": role}).json()["token"]
            for role in ("auditor", "security-officer")
        }
    return server, admin, people, tmp_path


def _agent(server: ServerProcess, admin: str, tmp: Path, name: str) -> tuple[Path, Path]:
    issued = server.cli_json("ca", "issue", name, "--role", "agent", "--out-dir", str(tmp / name), token=admin)
    assert oct(Path(issued["key"]).stat().st_mode)[-3:] == "600"
    return Path(issued["cert"]), Path(issued["key"])


def _audit(server: ServerProcess, admin: str) -> list[dict]:
    with server.http(admin) as c:
        return [json.loads(r["body"]) for r in c.get("/audit", params={"limit": 1000}).json()["records"]]


def test_machines_do_not_decrypt_by_default_and_policy_names_who_does(site: tuple) -> None:
    server, admin, people, tmp = site
    app, stranger = _agent(server, admin, tmp, "orders-app"), _agent(server, admin, tmp, "web-1")
    with server.http(admin) as c:
        pair = c.post("/keys/orders/generate-data-key", json={}).json()
    server.registry.b64(pair["plaintext"], "admin data key")
    # the built-in set: a machine certificate releases volumes, it does not use envelope keys
    with server.http(cert=app) as c:
        r = c.post("/decrypt", json={"ciphertext": pair["ciphertext"]})
        assert r.status_code == 403 and r.json()["code"] == "no_permit", r.text
    # the tenant's policy names the application; its own roles.cedar takes the admins' key use away
    with server.http(admin) as c:
        r = c.put("/policy", json={"sources": {"roles.cedar": APP_ONLY}})
        assert r.status_code in (200, 201), r.text
    time.sleep(1.2)  # the set in force is cached for a second
    with server.http(cert=app) as c:
        opened = c.post("/decrypt", json={"ciphertext": pair["ciphertext"]})
        assert opened.status_code == 200 and opened.json()["plaintext"] == pair["plaintext"], opened.text
        made = c.post("/keys/orders/encrypt", json={"plaintext": "aGVsbG8="})
        assert made.status_code == 200
    for who in (people["auditor"], people["security-officer"], admin):
        with server.http(who) as c:
            for path, body in (
                ("/decrypt", {"ciphertext": pair["ciphertext"]}),
                ("/keys/orders/encrypt", {"plaintext": "aGVsbG8="}),
                ("/keys/orders/generate-data-key", {}),
            ):
                r = c.post(path, json=body)
                assert r.status_code == 403 and r.json()["code"] == "no_permit", (path, r.text)
                assert "plaintext" not in r.json()
    with server.http(cert=stranger) as c:  # another certificate of the same CA is not the application
        r = c.post("/decrypt", json={"ciphertext": pair["ciphertext"]})
        assert r.status_code == 403 and r.json()["code"] == "no_permit"
        # asking for a key that does not exist tells a stranger nothing more than a refusal
        r = c.post("/keys/no-such-key/encrypt", json={"plaintext": "aGVsbG8="})
        assert r.status_code == 403 and r.json()["code"] == "no_permit"
    records = _audit(server, admin)
    denials = [r for r in records if r["action"] == "key.decrypt" and r.get("outcome") == "denied"]
    assert len(denials) >= 5 and all(r["reason"] == "no_permit" and "request" in r["details"] for r in denials)
    assert any(r["action"] == "key.decrypt" and r.get("outcome", "ok") != "denied" for r in records)


def test_policy_forbids_decrypt_outside_a_network_range(site: tuple) -> None:
    server, admin, _, _ = site
    with server.http(admin) as c:
        pair = c.post("/keys/orders/generate-data-key", json={}).json()
        server.registry.b64(pair["plaintext"], "admin data key")
        assert c.post("/decrypt", json={"ciphertext": pair["ciphertext"]}).status_code == 200
        r = c.put("/policy", json={"sources": {"net.cedar": DECRYPT_FROM_10_ONLY}})
        assert r.status_code in (200, 201), r.text
        r = c.post("/decrypt", json={"ciphertext": pair["ciphertext"]})  # from 127.0.0.1
        assert r.status_code == 403 and r.json()["code"] == "forbidden_by_policy", r.text
        assert "decrypt-only-from-10" in r.json()["detail"]
        # a caller on the host claiming an address inside the range is still where its TCP peer is
        spoofed = {"X-Forwarded-For": "10.9.9.9", "X-Real-IP": "10.9.9.9", "Forwarded": "for=10.9.9.9"}
        r = c.post("/decrypt", json={"ciphertext": pair["ciphertext"]}, headers=spoofed)
        assert r.status_code == 403 and r.json()["code"] == "forbidden_by_policy", r.text
        # encrypt is not what the rule forbids: the built-in role grant still holds beside it
        assert c.post("/keys/orders/encrypt", json={"plaintext": "aGk="}).status_code == 200


def _csr(key: ec.EllipticCurvePrivateKey, cn: str, uri: str | None, ca: bool = False) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if uri:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_certificates_only_from_csrs_that_ask_for_nothing_more(site: tuple) -> None:
    server, admin, _, tmp = site
    key = ec.generate_private_key(ec.SECP256R1())
    before = [r for r in _audit(server, admin) if r["action"] == "ca.issue"]
    with server.http(admin) as c:
        r = c.post("/ca/issue", json={"name": "web-9", "role": "agent"})  # no CSR: the server makes no keys
        assert r.status_code == 400 and r.json()["code"] == "csr_required"
        for name, csr, code in (
            ("web-9", _csr(key, "web-9", "keysteward:globex/agent/web-9"), "bad_csr"),  # another tenant
            ("web-9", _csr(key, "db-1", None), "bad_csr"),  # another machine's name
            ("web-9", _csr(key, "web-9", None, ca=True), "bad_csr"),  # a CA certificate
        ):
            r = c.post("/ca/issue", json={"name": name, "role": "agent", "csr_pem": csr})
            assert r.status_code == 400 and r.json()["code"] == code, r.text
        oversized = _csr(key, "web-9", None) + "x" * 70_000
        r = c.post("/ca/issue", json={"name": "web-9", "role": "agent", "csr_pem": oversized})
        assert r.status_code in (400, 413, 422)
        garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        r = c.post("/ca/issue", json={"name": "web-9", "role": "agent", "csr_pem": garbage})
        assert r.status_code == 400 and r.json()["code"] == "bad_csr"
    assert [r for r in _audit(server, admin) if r["action"] == "ca.issue"] == before  # nothing issued
    # the CSR the CLI makes is accepted, and the key it wrote never crossed the wire
    cert, key_file = _agent(server, admin, tmp, "ok-1")
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    assert issued.public_key() == serialization.load_pem_private_key(key_file.read_bytes(), None).public_key()
    server.registry.secret(key_file.read_bytes(), "machine private key")  # scanned for in logs and db


PROD_DESTROYED_ONLY_BY_BOB = (Path(__file__).parents[2] / "docs/policies/admin-rules.cedar").read_text()


def _register(server: ServerProcess, token: str, name: str, labels: dict[str, str]) -> str:
    with server.http(token) as c:
        assert c.post("/keys", json={"name": "volumes"}).status_code in (201, 409)
    client = AgentClient(server.url, ca_file=str(server.settings.server.tls_ca), token=token)
    try:
        made = client.register_volume(
            {"name": name, "key": "volumes", "labels": labels, "binding": {"host": "proxy-1"}}
        )
    finally:
        client.close()
    server.registry.secret(bytes(made.secret.view()), "volume secret")
    made.secret.wipe()
    return str(made.volume["id"])


def test_admin_actions_are_asked_of_the_tenant_policy(site: tuple) -> None:
    """volume_destroy, volume_revoke and policy_update are evaluated where they happen: an admin that the
    roles allow is still refused by a tenant forbid, the refusal is audited and nothing changes."""
    server, admin, people, _ = site
    with server.http(admin) as c:
        bob = c.post("/tokens", json={"name": "bob", "role": "admin"}).json()["token"]
        r = c.put("/policy", json={"sources": {"admin-rules.cedar": PROD_DESTROYED_ONLY_BY_BOB}})
        assert r.status_code == 200, r.text
    prod, test = _register(server, admin, "db-prod", {"env": "prod"}), _register(server, admin, "db-test", {})
    with server.http(admin) as c:
        r = c.post(f"/volumes/{prod}/destroy", json={"reason": "mistake"})
        assert r.status_code == 403 and r.json()["code"] == "forbidden_by_policy", r.text
        assert "prod-destroyed-only-by-bob" in r.json()["detail"]
        assert c.get(f"/volumes/{prod}").json()["state"] == "active"  # nothing shredded
        assert c.post(f"/volumes/{test}/destroy", json={}).json()["state"] == "destroyed"
    with server.http(people["security-officer"]) as c:
        r = c.post(f"/volumes/{prod}/revoke", json={"shred": False, "reason": "x"})
        assert r.status_code == 403 and r.json()["code"] == "forbidden_by_policy", r.text
    with server.http(bob) as c:
        assert c.post(f"/volumes/{prod}/revoke", json={"shred": False}).json()["state"] == "revoked"
        assert c.post(f"/volumes/{prod}/destroy", json={"reason": "end of life"}).json()["state"] == "destroyed"
    records = _audit(server, admin)
    refused = [
        r for r in records if r.get("outcome") == "denied" and r["action"] in ("volume.destroy", "volume.revoke")
    ]
    assert {(r["action"], r["target"]) for r in refused} == {("volume.destroy", f"volume:{prod}"),
                                                            ("volume.revoke", f"volume:{prod}")}  # fmt: skip
    assert all(r["reason"] == "forbidden_by_policy" for r in refused)
    done = [r for r in records if r["action"] == "volume.destroy" and r["outcome"] == "ok"]
    assert [(r["target"], r["actor"].split("/")[-1]) for r in done] == [(f"volume:{test}", "admin"),
                                                                         (f"volume:{prod}", "bob")]  # fmt: skip


def test_a_policy_update_is_decided_by_the_set_in_force_and_cannot_lock_out(site: tuple) -> None:
    server, admin, _, _ = site
    no_more_changes = '@id("frozen")\nforbid (principal, action == Keysteward::Action::"policy_update", resource);\n'
    without_update = APP_ONLY.split('@id("admins-manage")')[0]
    with server.http(admin) as c:
        before = c.get("/policy").json()["version"]
        # a set that takes policy_update away from its own author is refused, and nothing is stored
        r = c.put("/policy", json={"sources": {"roles.cedar": without_update}})
        assert r.status_code == 409 and r.json()["code"] == "policy_lockout", r.text
        r = c.put("/policy", json={"sources": {"frozen.cedar": no_more_changes}})
        assert r.status_code == 409 and r.json()["code"] == "policy_lockout", r.text
        assert c.get("/policy").json()["version"] == before
        # a set in force that forbids a person to change it is obeyed
        bob = c.post("/tokens", json={"name": "bob", "role": "admin"}).json()["token"]
        not_bob = '@id("not-bob")\nforbid (principal == Keysteward::Human::"acme/bob", action, resource);\n'
        assert c.put("/policy", json={"sources": {"not-bob.cedar": not_bob}}).status_code == 200
    with server.http(bob) as c:
        r = c.put("/policy", json={"sources": {}})
        assert r.status_code == 403 and r.json()["code"] == "forbidden_by_policy", r.text
        assert c.get("/policy").json()["sources"] == {"not-bob.cedar": not_bob}
    denied = [r for r in _audit(server, admin) if r["action"] == "policy.update" and r.get("outcome") == "denied"]
    assert len(denied) == 1 and denied[0]["actor"] == "token:acme/admin/bob"


def test_destructive_verbs_refuse_without_a_terminal_or_yes(site: tuple) -> None:
    """`volume destroy IMG </dev/null` used to crypto-shred at once: now every destroying, shredding or
    revoking verb refuses without --yes when stdin is not a terminal, and changes nothing."""
    server, admin, _, tmp = site
    volume = _register(server, admin, "scratch", {})
    _agent(server, admin, tmp, "web-1")
    verbs = [
        ("volume", "destroy", volume, "--kms", server.url, "--ca-file", str(server.settings.server.tls_ca)),
        ("volume", "revoke", volume, "--shred", "--kms", server.url, "--ca-file", str(server.settings.server.tls_ca)),
        ("key", "destroy", "orders"),
        ("instance", "revoke", "host:proxy-1"),
        ("ca", "revoke", "agent:web-1"),
        ("ca", "rotate", "--retire"),
    ]
    for verb in verbs:
        r = server.cli(*verb, token=admin, check=False, input="y\n")  # a piped "y" is not a confirmation
        assert r.returncode != 0 and "confirmation_required" in r.stderr, (verb, r.stdout, r.stderr)
    with server.http(admin) as c:
        assert c.get(f"/volumes/{volume}").json()["state"] == "active"
        assert c.get("/keys/orders").json()["state"] == "enabled"
    assert not [r for r in _audit(server, admin) if r["action"] in ("volume.destroy", "volume.revoke", "key.destroy")]
    r = server.cli("volume", "destroy", volume, "--yes", "--kms", server.url, "--ca-file",
                   str(server.settings.server.tls_ca), token=admin)  # fmt: skip
    with server.http(admin) as c:
        assert c.get(f"/volumes/{volume}").json()["state"] == "destroyed"


def test_a_shown_policy_set_can_be_stored_back(site: tuple) -> None:
    """`policy show > x.cedar; policy set x.cedar` stores the same files again (the show used `#` lines,
    which Cedar refuses); a file with a broken mark is refused and nothing is stored."""
    server, admin, _, tmp = site
    shown = tmp / "shown.cedar"
    shown.write_text(server.cli("policy", "show", token=admin).stdout)
    stored = server.cli_json("policy", "set", str(shown), token=admin)
    assert stored["version"] == 1
    with server.http(admin) as c:
        assert set(c.get("/policy").json()["sources"]) == {"binding.cedar", "roles.cedar"}
    again = tmp / "again.cedar"
    again.write_text(server.cli("policy", "show", token=admin).stdout)
    assert server.cli_json("policy", "set", str(again), token=admin)["version"] == 2
    twice = tmp / "twice.cedar"
    twice.write_text("// keysteward-policy-file: a.cedar\n// keysteward-policy-file: a.cedar\n")
    refused = server.cli("policy", "set", str(twice), token=admin, check=False)
    assert refused.returncode == 1 and "policy_files" in refused.stderr
    with server.http(admin) as c:
        assert c.get("/policy").json()["version"] == 2


def test_audit_show_prints_one_record_whole(site: tuple) -> None:
    server, admin, _, _ = site
    newest = _audit(server, admin)[-1]
    shown = server.cli_json("audit", "show", str(newest["seq"]), token=admin)
    assert {k: shown[k] for k in ("seq", "action", "actor", "target")} == {
        k: newest[k] for k in ("seq", "action", "actor", "target")
    }
    assert len(shown["hash"]) == 64 and shown["signature"]
    human = server.cli("audit", "show", str(newest["seq"]), token=admin).stdout
    assert f"seq: {newest['seq']}" in human and newest["action"] in human
    missing = server.cli("audit", "show", "999999", token=admin, check=False)
    assert missing.returncode == 1 and "no audit record 999999" in missing.stderr
    bad = server.cli("audit", "show", "0", token=admin, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_bad_value_is_explained_not_shown_as_a_regex(site: tuple) -> None:
    server, admin, _, _ = site
    boss = server.cli("token", "create", "t1", "--role", "boss", token=admin, check=False)
    assert boss.returncode == 1 and "must be one of admin, security-officer, auditor" in boss.stderr
    assert "^(" not in boss.stderr and "pattern" not in boss.stderr
    with server.http(admin) as c:
        r = c.post("/keys", json={"name": "Bad Name!"})
        assert r.status_code == 422 and "starting with a letter or digit" in r.json()["detail"], r.text
