"""Issue 12, item 5: vCenter's sequence against a real KMIP listener, a new TLS connection per operation.

DiscoverVersions with an empty payload, then with a batch id; Query (server information); Create AES-256 with
only algorithm, length and usage mask (no Name); GetAttributes of x-Product_Version, x-Vendor, x-Product
(absent: Success with no attribute); one batch of three AddAttribute; Get while Pre-Active; State, Activate;
later x-Identifier, x-Component, x-Name, which the audit record of the next Get names.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import STATE
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn, aes_256_template, attribute, batch_item, query_server_information
from tests.support.kmip_client import text as value
from tests.support.kmip_client import uid as uid_item
from tests.support.kmip_site import KmipSite, make_kmip_site

pytestmark = pytest.mark.e2e


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(tmp_path, server_factory, secret_registry)


def test_vsphere_sequence(site: KmipSite, secret_registry: SecretRegistry) -> None:
    cert, key, _ = site.issue("vcenter")
    ctx = site.tls((cert, key))

    def conn() -> KmipConn:
        return KmipConn(site.port, ctx, version=(1, 1))  # vCenter negotiates down from what the server lists

    with conn() as c:
        versions = c.one("DiscoverVersions")
        assert versions.ok and versions.payload is not None
        served = [(v.items[0].value, v.items[1].value) for v in versions.payload.all("ProtocolVersion")]
        assert served[0] == (1, 4) and (1, 1) in served
    with conn() as c:
        again = c.one("DiscoverVersions", batch_id=b"\x00\x01")
        assert again.ok and again.batch_id == b"\x00\x01"
    with conn() as c:
        info = c.one("Query", query_server_information())
        assert info.ok and info.payload is not None
        vendor = info.payload.first("VendorIdentification")
        assert vendor is not None and vendor.value == "keysteward"
    with conn() as c:
        created = c.one("Create", *aes_256_template())
        assert created.ok, created.reason
        uid = created.uid()
    with conn() as c:
        names = [t.text("AttributeName", n) for n in ("x-Product_Version", "x-Vendor", "x-Product")]
        absent = c.one("GetAttributes", uid_item(uid), *names)
        assert absent.ok and absent.attributes() == {}
    with conn() as c:
        tags = [("x-Vendor", "VMware, Inc."), ("x-Product", "VMware vSphere"), ("x-Product_Version", "8.0.2")]
        results = c.request(*(
            batch_item("AddAttribute", uid_item(uid), attribute(n, value(v)), batch_id=bytes([i]))
            for i, (n, v) in enumerate(tags)
        ))  # fmt: skip
        assert [r.ok for r in results] == [True] * 3
        assert [r.batch_id for r in results] == [b"\x00", b"\x01", b"\x02"]
    with conn() as c:
        got = c.one("Get", uid_item(uid))
        assert got.ok, got.reason  # Pre-Active keys are served: vCenter relies on it
        assert got.payload is not None
        material = next(i for i in got.payload.walk() if i.name == "KeyMaterial").value
        assert isinstance(material, bytes) and len(material) == 32
        secret_registry.secret(material, "vSphere key")
    with conn() as c:
        state = c.one("GetAttributes", uid_item(uid), t.text("AttributeName", "State"))
        assert state.attributes()["State"][0].value == STATE["PreActive"]
    with conn() as c:
        assert c.one("Activate", uid_item(uid)).ok
    with conn() as c:
        state = c.one("GetAttributes", uid_item(uid), t.text("AttributeName", "State"))
        assert state.attributes()["State"][0].value == STATE["Active"]
        assert c.one("Activate", uid_item(uid)).reason == "PermissionDenied"  # only a pre-active key activates
    with conn() as c:
        later = [("x-Identifier", "5003a1b2-vm"), ("x-Component", "Virtual Machine"), ("x-Name", "db-01")]
        results = c.request(*(batch_item("AddAttribute", uid_item(uid), attribute(n, value(v))) for n, v in later))
        assert all(r.ok for r in results)
        assert c.one("Get", uid_item(uid)).ok
        listed = c.one("GetAttributes", uid_item(uid))
        assert listed.attributes()["x-Component"][0].value == "Virtual Machine"
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/vcenter", token=site.admin)
    gets = [r for r in records if r["action"] == "kmip.get"]
    assert gets[-1]["details"]["x-Name"] == "db-01" and gets[-1]["details"]["x-Component"] == "Virtual Machine"
    assert gets[-1]["target"] == f"kmip:{uid}"
    # /metrics (loopback): KMIP operations per operation and result, latency; no tenant, no identifier
    with httpx.Client(base_url=site.server.url, verify=site.tls(None), timeout=30) as near:
        metrics = near.get("/metrics").text
    assert 'keysteward_kmip_operations_total{operation="Get",result="Success"} 2.0' in metrics
    assert 'keysteward_kmip_operations_total{operation="Activate",result="PermissionDenied"} 1.0' in metrics
    assert "keysteward_kmip_operation_seconds_bucket" in metrics and uid not in metrics and "acme" not in metrics
    # keysteward kmip status|clients|objects: the tenant's view, no material
    status = site.server.cli_json("kmip", "status", token=site.admin)
    assert status["enabled"] and status["objects"] == {"Active": 1} and status["listen"].endswith(f":{site.port}")
    [client] = site.server.cli_json("kmip", "clients", token=site.admin)
    assert client["name"] == "vcenter" and client["objects_created"] == 1 and not client["revoked"]
    [listed] = site.server.cli_json("kmip", "objects", token=site.admin)
    assert listed["uid"] == uid and listed["vm"] == "db-01" and listed["last_get_at"]
    assert "KeyMaterial" not in str(listed)
    assert site.server.cli_json("kmip", "objects", "--stale-days", "1", token=site.admin) == []
    assert [o["uid"] for o in site.server.cli_json("kmip", "objects", "--stale-days", "0", token=site.admin)] == [uid]


def _vcenter_csr(common_name: str) -> tuple[bytes, bytes]:
    """A CSR as vCenter makes it: its own key, a subject with its host name, no keysteward SAN."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "VMware")])  # fmt: skip
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return csr.public_bytes(serialization.Encoding.PEM), pem


def test_trust_mode_csr_and_foreign_certificates(site: KmipSite) -> None:
    """Trust mode B: keysteward signs vCenter's CSR (its key never leaves vCenter); a CSR naming another
    machine is refused; a client certificate from a CA of its own fails the handshake."""
    csr, key = _vcenter_csr("vcsa.example.com")
    (site.tmp / "vcenter.csr").write_bytes(csr)
    (site.tmp / "vcenter.key").write_bytes(key)
    out = site.tmp / "signed"
    site.server.cli("ca", "sign-csr", str(site.tmp / "vcenter.csr"), "--name", "vcsa.example.com",
                    "--out-dir", str(out), token=site.admin)  # fmt: skip
    ctx = site.tls((out / "vcsa.example.com.pem", site.tmp / "vcenter.key"))
    with KmipConn(site.port, ctx) as c:
        assert c.one("Create", *aes_256_template()).ok
    refused = site.server.cli("ca", "sign-csr", str(site.tmp / "vcenter.csr"), "--name", "esx-1",
                              "--out-dir", str(out), token=site.admin, check=False)  # fmt: skip
    assert refused.returncode != 0 and "bad_csr" in refused.stderr
    from keysteward.crypto import x509ca

    own_ca, own_key = x509ca.new_ca("not the tenant's CA")
    forged = x509ca.issue_client_cert(own_ca, own_key, tenant="acme", role="hypervisor", name="esx-1")
    assert forged.key_pem is not None
    (site.tmp / "forged.pem").write_text(forged.cert_pem)
    (site.tmp / "forged.key").write_bytes(bytes(forged.key_pem))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with KmipConn(site.port, site.tls((site.tmp / "forged.pem", site.tmp / "forged.key"))) as c:
            c.one("Locate")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with KmipConn(site.port, site.tls(None)) as c:  # no client certificate at all
            c.one("Locate")


def test_trust_mode_bundle_pem_and_pkcs12(site: KmipSite) -> None:
    """Trust mode A: keysteward issues the key and certificate, as PEM files and as a PKCS#12 bundle (0600,
    under the passphrase given) that a KMIP client can import and connect with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    (site.tmp / "p12.pass").write_text("correct horse battery\n")
    out = site.tmp / "bundle"
    made = site.server.cli_json("ca", "issue", "vcenter", "--role", "hypervisor", "--out-dir", str(out),
                                "--p12-passphrase-file", str(site.tmp / "p12.pass"), token=site.admin)  # fmt: skip
    p12 = Path(made["p12"])
    assert p12.stat().st_mode & 0o777 == 0o600 and (out / "vcenter.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(p12.read_bytes(), b"wrong passphrase")
    key, cert, cas = pkcs12.load_key_and_certificates(p12.read_bytes(), b"correct horse battery")
    assert key is not None and cert is not None and len(cas) == 1
    (site.tmp / "from-p12.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (site.tmp / "from-p12.key").write_bytes(key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    with KmipConn(site.port, site.tls((site.tmp / "from-p12.pem", site.tmp / "from-p12.key"))) as c:
        assert c.one("Create", *aes_256_template()).ok
