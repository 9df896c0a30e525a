"""Issue 11, item 1: machine certificates end when revoked, on every server; CAs rotate without downtime; holders
renew short-lived certificates. Two real server processes share one PostgreSQL database.

- ``ca revoke agent:NAME`` on server A: the agent's open keep-alive connection to server B is refused within a
  second (``cert_revoked``); ``instance revoke host:NAME`` does the same to the host's certificate, whose
  ``POST /v1/decrypt`` it could call before; a revoked serial cannot renew;
- ``ca rotate``: a machine with an old-CA certificate keeps working on both servers, a new-CA certificate works
  right after; the old-CA holder renews onto the new CA; ``ca rotate --retire`` ends the old CA's certificates
  on both servers within a second;
- ``ca renew``: only the holder, with its current certificate; never with a token.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keysteward.crypto import x509csr
from keysteward.crypto.x509identity import identity_uri
from keysteward.errors import Unauthenticated
from keysteward.keys.ca import ca_key_aad
from tests.fixtures.keysteward import Manager, SecretRegistry, ServerProcess, free_port, init_manager

pytestmark = pytest.mark.e2e
HOST_DECRYPTS = """
permit (principal == Keysteward::Host::"acme/proxy-1", action == Keysteward::Action::"decrypt",
        resource == Keysteward::Key::"acme/env");
"""
STALE = 1.3
"""A revocation or retirement is seen by every server within a second; this much later it must be."""


def two_servers(
    tmp: Path, pg_url: str, server_factory: Callable[..., ServerProcess], registry: SecretRegistry
) -> tuple[ServerProcess, ServerProcess, str]:
    """Servers A and B on one database, and the admin token of tenant acme."""
    out = init_manager(tmp / "a", registry, db_url=pg_url)
    a = server_factory(tmp / "a")
    b_dir = tmp / "b"
    b_dir.mkdir()
    text = (tmp / "a" / "keysteward.toml").read_text()
    port_a = f"listen_port = {a.settings.server.listen_port}"
    (b_dir / "keysteward.toml").write_text(text.replace(port_a, f"listen_port = {free_port()}"))
    b = server_factory(b_dir)
    with a.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    return a, b, admin


def issue(server: ServerProcess, admin: str, name: str, role: str, out: Path) -> tuple[Path, Path, str]:
    made = server.cli_json("ca", "issue", name, "--role", role, "--out-dir", str(out), token=admin)
    return Path(made["cert"]), Path(made["key"]), str(made["serial"])


def whoami(client: httpx.Client) -> httpx.Response:
    return client.get("/whoami")


def wait_refused(client: httpx.Client, code: str) -> float:
    """Seconds until ``client`` (an open connection) is refused with ``code``; fails after STALE seconds."""
    start = time.monotonic()
    while time.monotonic() - start < STALE:
        r = whoami(client)
        if r.status_code == 401:
            assert r.json()["code"] == code, r.text
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"still accepted {STALE} s later")


def audit_actions(server: ServerProcess, admin: str) -> list[dict[str, object]]:
    with server.http(admin) as c:
        return [json.loads(r["body"]) for r in c.get("/audit", params={"limit": 1000}).json()["records"]]


def test_revocation_ends_access_on_every_server_within_a_second(
    tmp_path: Path, pg_url: str, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    a, b, admin = two_servers(tmp_path, pg_url, server_factory, secret_registry)
    a.cli("ca", "init", token=admin)
    web = issue(a, admin, "web-1", "agent", tmp_path / "web")
    web_2 = issue(a, admin, "web-1", "agent", tmp_path / "web2")  # a second certificate of the same machine
    host = issue(a, admin, "proxy-1", "host", tmp_path / "host")
    other = issue(a, admin, "web-2", "agent", tmp_path / "other")
    # 90 days by default, no longer than that on request
    not_after = dt.datetime.fromisoformat(a.cli_json("ca", "issue", "x", "--out-dir", str(tmp_path / "x"),
                                                     token=admin)["not_after"])  # fmt: skip
    assert dt.timedelta(days=89) < not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(days=90)
    too_long = a.cli("ca", "issue", "y", "--days", "365", "--out-dir", str(tmp_path / "y"), token=admin, check=False)
    assert too_long.returncode != 0 and "less than or equal to 90" in too_long.stderr
    time.sleep(STALE)  # server B trusts the new tenant CA for TLS

    with a.http(admin) as c:
        assert c.post("/keys", json={"name": "env"}).status_code == 201
        pair = c.post("/keys/env/generate-data-key", json={}).json()
        secret_registry.b64(pair["plaintext"], "admin data key")
        # the tenant lets its host decrypt (the default does not): what a revocation must end
        r = c.put("/policy", json={"sources": {"host.cedar": HOST_DECRYPTS}})
        assert r.status_code < 300, r.text
    time.sleep(STALE)

    with (
        b.http(cert=web[:2]) as agent_b,
        b.http(cert=web_2[:2]) as agent_b2,
        b.http(cert=host[:2]) as host_b,
        b.http(cert=other[:2]) as other_b,
    ):
        assert whoami(agent_b).json()["name"] == "web-1" and whoami(agent_b2).status_code == 200
        decrypted = host_b.post("/decrypt", json={"ciphertext": pair["ciphertext"]})
        assert decrypted.status_code == 200, decrypted.text
        secret_registry.b64(decrypted.json()["plaintext"], "host data key")

        # revoking the machine by name on A ends both of its certificates on B, on the open connections
        revoked = a.cli_json("ca", "revoke", "--yes", "agent:web-1", "--reason", "stolen laptop", token=admin)
        assert sorted(revoked["revoked"]) == sorted([web[2], web_2[2]])
        assert wait_refused(agent_b, "cert_revoked") < STALE
        assert wait_refused(agent_b2, "cert_revoked") < STALE  # each within a second of the revocation
        assert whoami(other_b).status_code == 200  # another machine of the tenant is untouched

        # instance revoke host:NAME revokes the host's certificate: no more decrypt, on either server
        a.cli("instance", "revoke", "--yes", "host:proxy-1", "--reason", "decommissioned", token=admin)
        wait_refused(host_b, "cert_revoked")
        refused = host_b.post("/decrypt", json={"ciphertext": pair["ciphertext"]})
        assert refused.status_code == 401 and refused.json()["code"] == "cert_revoked"
    with a.http(cert=host[:2]) as host_a:
        assert whoami(host_a).json()["code"] == "cert_revoked"

    # by serial, with the --role spelling refused when it is ambiguous; bad targets are refused
    with a.http(admin) as c:  # a security officer revokes too (an emergency needs no admin)
        officer = c.post("/tokens", json={"name": "so", "role": "security-officer"}).json()["token"]
    assert a.cli_json("ca", "revoke", "--yes", other[2].upper(), token=officer)["revoked"] == [other[2]]
    assert a.cli_json("ca", "revoke", "--yes", other[2], token=admin)["revoked"] == []  # already revoked: nothing new
    for bad in ("zz-not-hex", "agent:", "agent:Bad Name", "root:web-1", "0x" + "f" * 41):
        r = a.cli("ca", "revoke", "--yes", bad, token=admin, check=False)
        assert r.returncode != 0 and ("bad_revoke_target" in r.stderr or "bad_name" in r.stderr), (bad, r.stderr)
    r = a.cli("ca", "revoke", "--yes", "nobody", "--role", "agent", token=admin, check=False)
    assert r.returncode != 0 and "cert_not_found" in r.stderr
    r = a.cli("ca", "revoke", "--yes", "host:x", "--role", "agent", token=admin, check=False)
    assert r.returncode != 0

    # a revoked certificate cannot renew itself back to life
    renewed = a.cli("--cert", str(web[0]), "--key", str(web[1]), "ca", "renew", "--json", check=False)
    assert renewed.returncode != 0 and "cert_revoked" in renewed.stderr

    # an auditor cannot revoke; each revocation is audited with its serials and reason
    with a.http(admin) as c:
        auditor = c.post("/tokens", json={"name": "aud", "role": "auditor"}).json()["token"]
    denied = a.cli("ca", "revoke", "--yes", "agent:web-2", token=auditor, check=False)
    assert denied.returncode != 0 and "role_forbidden" in denied.stderr
    records = audit_actions(b, admin)
    revokes = [r for r in records if r["action"] == "ca.revoke" and r.get("outcome") != "denied"]
    assert any(r["action"] == "ca.revoke" and r.get("outcome") == "denied" for r in records)
    assert {r["target"] for r in revokes} == {"agent:web-1", f"cert:{other[2]}"}
    assert any("stolen laptop" in json.dumps(r["details"]) for r in revokes)
    instance = next(r for r in records if r["action"] == "instance.revoke")
    assert instance["details"]["revoked_certs"] == [host[2]]  # type: ignore[index]


def test_rotation_keeps_machines_working_until_retire(
    tmp_path: Path, pg_url: str, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    a, b, admin = two_servers(tmp_path, pg_url, server_factory, secret_registry)
    a.cli("ca", "init", token=admin)
    old = issue(a, admin, "web-1", "agent", tmp_path / "old")
    mover = issue(a, admin, "web-2", "agent", tmp_path / "mover")
    time.sleep(STALE)
    retire_early = a.cli("ca", "rotate", "--retire", "--yes", token=admin, check=False)
    assert retire_early.returncode != 0 and "ca_no_previous" in retire_early.stderr

    with b.http(cert=old[:2]) as old_b, a.http(cert=old[:2]) as old_a:
        assert whoami(old_b).status_code == 200
        rotated = a.cli_json("ca", "rotate", token=admin)
        assert rotated["previous_pem"] and rotated["cert_pem"] != rotated["previous_pem"]
        # no downtime: the old-CA certificate goes on working on the same connections, on both servers
        assert whoami(old_b).status_code == 200 and whoami(old_a).status_code == 200
        # a certificate from the new CA works at once on the server that rotated, and on B within a second
        new = issue(a, admin, "web-3", "agent", tmp_path / "new")
        assert (
            x509.load_pem_x509_certificate(new[0].read_bytes()).issuer
            != x509.load_pem_x509_certificate(old[0].read_bytes()).issuer
        )
        with a.http(cert=new[:2]) as new_a:
            assert whoami(new_a).json()["name"] == "web-3"
        time.sleep(STALE)
        with b.http(cert=new[:2]) as new_b:
            assert whoami(new_b).json()["name"] == "web-3"
        # one rotation at a time
        again = a.cli("ca", "rotate", token=admin, check=False)
        assert again.returncode != 0 and "ca_rotation_pending" in again.stderr

        # re-issue: a holder of an old-CA certificate renews itself onto the new CA, with its own new key
        moved = a.cli_json("--cert", str(mover[0]), "--key", str(mover[1]), "ca", "renew")
        assert moved["renewed"] == mover[2] and moved["serial"] != mover[2]
        moved_cert = x509.load_pem_x509_certificate(Path(moved["cert"]).read_bytes())
        assert (
            moved_cert.issuer.rfc4514_string()
            == x509.load_pem_x509_certificate(new[0].read_bytes()).issuer.rfc4514_string()
        )
        assert oct(Path(moved["key"]).stat().st_mode)[-3:] == "600"

        # retire on A: the old CA's certificates end on both servers within a second
        a.cli("ca", "rotate", "--retire", "--yes", token=admin)
        assert wait_refused(old_b, "bad_client_cert") < STALE
        assert whoami(old_a).json()["code"] == "bad_client_cert"
    with b.http(cert=(Path(moved["cert"]), Path(moved["key"]))) as moved_b:
        assert whoami(moved_b).json()["name"] == "web-2"
    shown = a.cli_json("ca", "show", token=admin)
    assert shown["previous_pem"] is None and shown["cert_pem"] == rotated["cert_pem"]
    actions = [r["action"] for r in audit_actions(b, admin)]
    assert actions.count("ca.rotate") == 1 and actions.count("ca.retire") == 1 and actions.count("ca.renew") == 1


def test_only_the_holder_renews_and_only_while_valid(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    secret_registry: SecretRegistry,
    manager_factory: Callable[..., Manager],
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    server.cli("ca", "init", token=admin)
    cert, key, serial = issue(server, admin, "web-1", "agent", tmp_path / "web")
    key_pem, csr = x509csr.make_csr("acme", "agent", "web-1")
    key_pem[:] = bytes(len(key_pem))
    # a token (even the admin's) is not the holder
    with server.http(admin, cert=(cert, key)) as both:
        r = both.post("/ca/renew", json={"csr_pem": csr.decode()})
        assert r.status_code == 403 and r.json()["code"] == "renew_needs_certificate"
    with server.http(admin) as c:
        r = c.post("/ca/renew", json={"csr_pem": csr.decode()})
        assert r.status_code == 403
    with server.http() as anonymous:
        r = anonymous.post("/ca/renew", json={"csr_pem": csr.decode()})
        assert r.status_code == 401 and r.json()["code"] == "no_credentials"
    with server.http(cert=(cert, key)) as holder:
        # a CSR for another identity, a bad CSR, too long a validity: refused
        _k, other_csr = x509csr.make_csr("acme", "host", "web-1")
        _k[:] = bytes(len(_k))
        assert holder.post("/ca/renew", json={"csr_pem": other_csr.decode()}).json()["code"] == "bad_csr"
        assert holder.post("/ca/renew", json={"csr_pem": "not a csr"}).json()["code"] == "bad_csr"
        assert holder.post("/ca/renew", json={"csr_pem": csr.decode(), "days": 91}).status_code == 422
        r = holder.post("/ca/renew", json={"csr_pem": csr.decode(), "days": 30})
        assert r.status_code == 201, r.text
        assert r.json()["serial"] != serial

    # the CLI renews in place; without the certificate, or with something else in its place, it refuses
    renewed = server.cli_json("--cert", str(cert), "--key", str(key), "ca", "renew", "--days", "7")
    assert renewed["cert"] == str(cert) and renewed["renewed"] == serial
    assert oct(key.stat().st_mode)[-3:] == "600"
    with server.http(cert=(cert, key)) as holder:
        assert whoami(holder).json()["name"] == "web-1"
    missing = server.cli("ca", "renew", check=False)
    assert missing.returncode != 0 and "--cert" in missing.stderr
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    bad = server.cli("--cert", str(junk), "--key", str(key), "ca", "renew", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr

    # an expired certificate of the tenant's own CA does not renew (checked by the same service the route uses)
    manager = manager_factory()
    svc = manager.svc
    token = manager.tenant("acme")
    ca_pem = manager.call(token, "POST", "/v1/ca/init").json()["cert_pem"]
    tenant_id = svc.tenants.get("acme").id
    wrapped = svc.cas.certificate(tenant_id)[1]
    assert wrapped is not None
    ca_key = svc.root.root().open(wrapped, ca_key_aad(tenant_id))
    try:
        expired = _expired_cert(ca_pem, bytes(ca_key))
    finally:
        ca_key[:] = bytes(len(ca_key))
    with pytest.raises(Unauthenticated, match="expired"):
        svc.cas.renew(expired, csr)


def _expired_cert(ca_pem: str, ca_key_pem: bytes) -> bytes:
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    leaf = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web-1")]))
        .issuer_name(ca.subject)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - dt.timedelta(days=3), ca.not_valid_before_utc))
        .not_valid_after(now - dt.timedelta(minutes=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity_uri("acme", "agent", "web-1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.DER)
