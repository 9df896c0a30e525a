"""Issue 12, trust mode C (a hypervisor's self-signed certificate, pinned), and refusals of certificates, audited.

Against a real ``keysteward server start`` KMIP listener and real TLS clients:

- ``kmip client add/list/remove``: the pinned certificate is the hypervisor NAME of the tenant; a look-alike
  (another self-signed certificate with the same subject) is refused in the handshake; after remove the open
  connection is refused within about a second, and so is a new one;
- a pinned certificate is no issuer: a pinned self-signed CA certificate signs leaves (its own subject, and the
  tenant's identity URI for the pinned name): each is refused, nothing is created, and the refusals are
  counted in the pin's tenant with a fingerprint;
- a certificate that is not self-signed, has an EKU without clientAuth, is expired, or is garbage is not
  pinned; one that expires while pinned is refused after; tenant A's pin does not reach tenant B's objects;
- a certificate of role agent, and a revoked one, are refused and recorded with their fingerprints in their
  tenant;
- a Create the policy denies makes no KMIP KEK; the first permitted one does, and the audit chain verifies.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn, aes_256_template, batch_item, uid
from tests.support.kmip_site import KmipSite, make_kmip_site
from tests.support.selfsigned import CLIENT_AUTH, SERVER_AUTH, fingerprint, self_signed

pytestmark = pytest.mark.e2e
REVOCATION_SECONDS = 1.0 + 2.0
"""The servers' one-second certificate cache, and a margin for a loaded machine."""
REFUSAL_INTERVAL = 0.3


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(tmp_path, server_factory, secret_registry,
                          env={"KEYSTEWARD_AUDIT_REFUSAL_INTERVAL": str(REFUSAL_INTERVAL)})  # fmt: skip


def _pin(site: KmipSite, name: str, cert: Path, token: str | None = None) -> dict:
    return dict(site.server.cli_json("kmip", "client", "add", name, "--cert", str(cert), token=token or site.admin))


def _refused(site: KmipSite, ctx: ssl.SSLContext) -> bool:
    """The listener refuses this client: in the handshake, or Permission Denied for a Create."""
    try:
        with KmipConn(site.port, ctx) as c:
            return c.one("Create", *aes_256_template()).reason == "PermissionDenied"
    except (ssl.SSLError, ConnectionError, OSError):
        return True


def _refusals(site: KmipSite, token: str, reason: str) -> list[dict]:
    """The counted refusal records of ``reason`` (actor anonymous), waiting for the interval's flush."""
    deadline = time.monotonic() + 5
    while True:
        records = site.server.cli_json("audit", "list", "--actor", "anonymous", token=token)
        found = [r for r in records if r["action"] == "kmip.connect" and r["reason"] == reason]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(REFUSAL_INTERVAL)


def _objects(site: KmipSite) -> int:
    return len(site.server.cli_json("kmip", "objects", token=site.admin))


def test_a_pinned_certificate_is_the_hypervisor_until_removed(site: KmipSite) -> None:
    cert, key = self_signed(site.tmp / "vcsa", "vcsa")
    added = _pin(site, "vcsa-1", cert)
    assert added["fingerprint"] == fingerprint(cert) and added["role"] == "hypervisor"
    [listed] = site.server.cli_json("kmip", "client", "list", token=site.admin)
    assert listed["name"] == "vcsa-1" and listed["fingerprint"] == fingerprint(cert)
    pinned = site.tls((cert, key))
    with KmipConn(site.port, pinned) as c:
        made = c.one("Create", *aes_256_template())
        assert made.ok and c.one("Get", uid(made.uid())).ok
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/vcsa-1", token=site.admin)
    assert {r["action"] for r in records} >= {"kmip.create", "kmip.get"}
    [client] = site.server.cli_json("kmip", "clients", token=site.admin)
    assert client == {"name": "vcsa-1", "trust": "pinned", "serial": f"sha256:{fingerprint(cert)}",
                      "not_after": client["not_after"], "revoked": False, "objects_created": 1}  # fmt: skip
    [pinning] = [r for r in site.server.cli_json("audit", "list", token=site.admin) if r["action"] == "kmip.client_add"]
    assert pinning["details"]["fingerprint"] == fingerprint(cert) and pinning["target"] == "hypervisor:vcsa-1"

    twin = self_signed(site.tmp / "twin", "vcsa")  # same subject, another key: not the pinned certificate
    assert _refused(site, site.tls(twin))  # in the handshake: its signature is not the pinned key's

    not_asked = site.server.cli("kmip", "client", "remove", "vcsa-1", token=site.admin, check=False, input="")
    assert not_asked.returncode != 0 and "--yes" in not_asked.stderr
    with KmipConn(site.port, pinned) as c:
        assert c.one("Get", uid(made.uid())).ok
        site.server.cli("kmip", "client", "remove", "vcsa-1", "--yes", token=site.admin)
        deadline = time.monotonic() + REVOCATION_SECONDS
        while c.one("Get", uid(made.uid())).ok:  # the open connection too, message by message
            assert time.monotonic() < deadline, "a removed pin still fetches keys"
            time.sleep(0.05)
    assert _refused(site, pinned)
    assert site.server.cli_json("kmip", "client", "list", token=site.admin) == []
    assert [c["revoked"] for c in site.server.cli_json("kmip", "clients", token=site.admin)] == [True]
    removed = _refusals(site, site.admin, "kmip_client_removed")
    assert removed and {r["target"] for r in removed} == {f"cert-sha256:{fingerprint(cert)}"}
    actions = [r["action"] for r in site.server.cli_json("audit", "list", token=site.admin)]
    assert "kmip.client_remove" in actions


def test_a_pinned_certificate_never_acts_as_an_issuer(site: KmipSite) -> None:
    # the worst case: the pinned self-signed certificate is a CA certificate (so OpenSSL would chain to it)
    anchor = self_signed(site.tmp / "anchor", "vcsa", is_ca=True)
    _pin(site, "vcsa-1", anchor[0])
    before = _objects(site)
    same_subject = self_signed(site.tmp / "leaf", "leaf", issuer=anchor, eku=[CLIENT_AUTH])
    names_pin = self_signed(site.tmp / "leaf2", "leaf2", "esx-1", issuer=anchor, eku=[CLIENT_AUTH],
                            uri="keysteward:acme/hypervisor/vcsa-1")  # fmt: skip
    for leaf in (same_subject, names_pin):
        assert _refused(site, site.tls(leaf)), leaf
    assert _objects(site) == before
    records = _refusals(site, site.admin, "bad_client_cert")  # traced to acme: by its issuer, the pin
    assert records and {r["target"] for r in records} <= {f"cert-sha256:{fingerprint(leaf[0])}"
                                                            for leaf in (same_subject, names_pin)}  # fmt: skip
    with KmipConn(site.port, site.tls(anchor)) as c:  # the pinned certificate itself still works
        assert c.one("Create", *aes_256_template()).ok


def test_only_acceptable_certificates_are_pinned_and_only_while_valid(site: KmipSite) -> None:
    folder = site.tmp / "bad"
    server_only = self_signed(folder, "server-only", eku=[SERVER_AUTH])
    expired = self_signed(folder, "expired", seconds=-60)
    issued = site.issue("esx-1")[0]  # a tenant-CA certificate is not self-signed
    garbage = folder / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    two = folder / "two.pem"
    two.write_text(self_signed(folder, "a")[0].read_text() + self_signed(folder, "b")[0].read_text())
    for bad in (server_only[0], expired[0], issued, garbage, two, folder / "missing.pem"):
        done = site.server.cli("kmip", "client", "add", "x", "--cert", str(bad), token=site.admin, check=False)
        assert done.returncode != 0 and "bad_client_cert" in done.stderr, (bad, done.stderr)
        assert "Traceback" not in done.stderr
    assert site.server.cli_json("kmip", "client", "list", token=site.admin) == []
    assert _refused(site, site.tls(server_only))  # not pinned, and no clientAuth: the handshake fails

    short = self_signed(folder, "short", seconds=4)
    _pin(site, "vcsa-2", short[0])
    again = site.server.cli("kmip", "client", "add", "vcsa-3", "--cert", str(short[0]), token=site.admin,
                            check=False)  # fmt: skip
    assert again.returncode != 0 and "kmip_client_exists" in again.stderr
    with KmipConn(site.port, site.tls(short)) as c:
        assert c.one("Create", *aes_256_template()).ok
    time.sleep(max(0.0, 4.5 - 1.0))
    deadline = time.monotonic() + REVOCATION_SECONDS + 2
    while not _refused(site, site.tls(short)):
        assert time.monotonic() < deadline, "an expired pinned certificate is still accepted"
        time.sleep(0.2)


def test_a_pin_of_tenant_a_does_not_reach_tenant_b(site: KmipSite) -> None:
    cert, key = self_signed(site.tmp / "vcsa", "vcsa")
    _pin(site, "vcsa-1", cert)
    with site.server.http(site.server_root_token()) as h:
        globex = str(h.post("/tenants", json={"name": "globex"}).json()["admin_token"]["token"])
    with site.server.http(globex) as h:
        assert h.post("/ca/init").status_code == 201
    theirs = site.server.cli_json("ca", "issue", "esx-9", "--role", "hypervisor", "--out-dir",
                                  str(site.tmp / "globex"), token=globex)  # fmt: skip
    with KmipConn(site.port, site.tls((Path(theirs["cert"]), Path(theirs["key"])))) as c:
        made = c.one("Create", *aes_256_template())
        assert made.ok
    with KmipConn(site.port, site.tls((cert, key))) as c:
        for operation in ("Get", "GetAttributes", "Destroy"):
            assert c.one(operation, uid(made.uid())).reason == "ItemNotFound", operation
        located = c.request(batch_item("Locate"))[0]
        assert located.payload is not None and located.payload.all("UniqueIdentifier") == []
    taken = site.server.cli("kmip", "client", "add", "vcsa-1", "--cert", str(cert), token=globex, check=False)
    assert taken.returncode != 0 and "kmip_client_exists" in taken.stderr
    assert site.server.cli_json("kmip", "client", "list", token=globex) == []


def test_refused_certificates_are_recorded_in_their_tenant(site: KmipSite) -> None:
    agent = site.issue("app-1", role="agent")
    assert _refused(site, site.tls(agent[:2]))
    records = _refusals(site, site.admin, "role_forbidden")
    assert records and {r["target"] for r in records} == {f"cert-sha256:{fingerprint(agent[0])}"}
    revoked = site.issue("esx-1")
    with KmipConn(site.port, site.tls(revoked[:2])) as c:
        assert c.one("Create", *aes_256_template()).ok
    site.server.cli("ca", "revoke", "--yes", "hypervisor:esx-1", token=site.admin)
    deadline = time.monotonic() + REVOCATION_SECONDS
    while not _refused(site, site.tls(revoked[:2])):
        assert time.monotonic() < deadline, "a revoked certificate is still accepted"
        time.sleep(0.1)
    records += _refusals(site, site.admin, "cert_revoked")
    assert {r["target"] for r in records if r["reason"] == "cert_revoked"} == {f"cert-sha256:{fingerprint(revoked[0])}"}
    assert all(r["actor"] == "anonymous" and r["action"] == "kmip.connect" for r in records)
    assert "BEGIN" not in str(records) and "PRIVATE" not in str(records)


def test_a_denied_create_makes_no_kmip_kek(site: KmipSite) -> None:
    forbid = ('@id("no-kmip-create")\nforbid (principal, action == Keysteward::Action::"kmip_create", '
              "resource is Keysteward::KmipObject);\n")  # fmt: skip
    with site.server.http(site.admin) as h:
        assert h.put("/policy", json={"sources": {"no-create.cedar": forbid}}).status_code == 200
    hypervisor = site.tls(site.issue("esx-1")[:2])
    with KmipConn(site.port, hypervisor) as c:
        assert c.one("Create", *aes_256_template()).reason == "PermissionDenied"
    assert "kmip" not in {k["name"] for k in site.server.cli_json("key", "list", token=site.admin)}
    with site.server.http(site.admin) as h:
        assert h.put("/policy", json={"sources": {}}).status_code == 200
    with KmipConn(site.port, hypervisor) as c:
        assert c.one("Create", *aes_256_template()).ok
        assert c.one("Create", *aes_256_template()).ok
    assert "kmip" in {k["name"] for k in site.server.cli_json("key", "list", token=site.admin)}
    created = [r for r in site.server.cli_json("audit", "list", token=site.admin) if r["action"] == "key.create"]
    assert len(created) == 1 and created[0]["actor"] == "cert:acme/hypervisor/esx-1"
    site.server.cli("audit", "verify", token=site.admin)
