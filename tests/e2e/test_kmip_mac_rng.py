"""Issue 12: MAC, MACVerify, Create of HMAC keys, RNG Retrieve and RNG Seed on a real KMIP listener.

- MAC of an Active HMAC-SHA384 key, MACVerify of the right MAC (Valid), of a changed one and of other data
  (Invalid); MACVerify still works on a Deactivated key, MAC no longer does;
- a key whose usage mask allows no MAC, an AES key, another algorithm than the key's: refused, nothing made;
- the tenant's Cedar policy forbids kmip_mac for one hypervisor: Permission Denied, audited;
- bad payloads (no Data, Data of the wrong type or oversized, a MAC Data too long, streaming fields, HMAC keys
  of lengths RFC 2104 advises against): the Result Reason says which, and nothing is stored;
- RNG Retrieve answers as many bytes as asked, up to the bound, refuses more and non-integers; RNG Seed
  answers Data Length 0 (the seed is not used).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import CRYPTOGRAPHIC_ALGORITHM, OBJECT_TYPE
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn, aes_256_template, attribute, uid
from tests.support.kmip_site import KmipSite, make_kmip_site

pytestmark = pytest.mark.e2e
MAC_GENERATE, MAC_VERIFY = 0x80, 0x100


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(tmp_path, server_factory, secret_registry)


def hmac_template(algorithm: str = "HmacSha384", bits: int = 384, mask: int = MAC_GENERATE | MAC_VERIFY) -> list:
    return [
        t.enumeration("ObjectType", OBJECT_TYPE["SymmetricKey"]),
        t.struct_(
            "TemplateAttribute",
            attribute("Cryptographic Algorithm", t.enumeration("AttributeValue", CRYPTOGRAPHIC_ALGORITHM[algorithm])),
            attribute("Cryptographic Length", t.integer("AttributeValue", bits)),
            attribute("Cryptographic Usage Mask", t.integer("AttributeValue", mask)),
        ),
    ]


def _params(algorithm: str) -> t.Item:
    return t.struct_("CryptographicParameters",
                     t.enumeration("CryptographicAlgorithm", CRYPTOGRAPHIC_ALGORITHM[algorithm]))  # fmt: skip


def _count(c: KmipConn) -> int:
    located = c.one("Locate")
    assert located.ok and located.payload is not None
    return len(located.payload.all("UniqueIdentifier"))


def test_mac_and_verify(site: KmipSite, secret_registry: SecretRegistry) -> None:
    import hashlib
    import hmac

    cert = site.issue("esx-1")[:2]
    with KmipConn(site.port, site.tls(cert)) as c:
        created = c.one("Create", *hmac_template())
        assert created.ok, created.reason
        kid = created.uid()
        assert c.one("Activate", uid(kid)).ok
        data = t.byte_string("Data", b"vm-7 nvram")
        made = c.one("Mac", uid(kid), _params("HmacSha384"), data)
        assert made.ok, made.reason
        mac = made.payload.first("MacData").value  # type: ignore[union-attr]
        material = c.one("Get", uid(kid)).payload.first("SymmetricKey").first("KeyBlock").first("KeyValue")  # type: ignore[union-attr]
        key = material.first("KeyMaterial").value  # type: ignore[union-attr]
        secret_registry.secret(key, "kmip hmac key")
        assert mac == hmac.new(key, b"vm-7 nvram", hashlib.sha384).digest()  # type: ignore[arg-type]

        def verify(value: bytes, payload: t.Item = data) -> int:
            answer = c.one("MacVerify", uid(kid), payload, t.byte_string("MacData", value))
            assert answer.ok, answer.reason
            return int(answer.payload.first("ValidityIndicator").value)  # type: ignore[union-attr,arg-type]

        assert verify(mac) == 1  # type: ignore[arg-type]
        assert verify(bytes([mac[0] ^ 1]) + mac[1:]) == 2  # type: ignore[index]
        assert verify(mac, t.byte_string("Data", b"vm-8 nvram")) == 2  # type: ignore[arg-type]
        revoke = t.struct_("RevocationReason", t.enumeration("RevocationReasonCode", 5))
        assert c.one("Revoke", uid(kid), revoke).ok
        assert verify(mac) == 1  # type: ignore[arg-type]
        assert c.one("Mac", uid(kid), data).reason == "PermissionDenied"
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-1", token=site.admin)
    verified = [r["details"].get("valid") for r in records if r["action"] == "kmip.mac_verify"]
    assert sorted(verified) == [False, False, True, True]
    assert mac.hex() not in str(records)  # type: ignore[union-attr]


def test_mac_refusals(site: KmipSite) -> None:
    cert = site.issue("esx-1")[:2]
    with KmipConn(site.port, site.tls(cert)) as c:
        no_mac = c.one("Create", *hmac_template(mask=0x0C))  # Encrypt | Decrypt only
        aes = c.one("Create", *aes_256_template())
        hmac256 = c.one("Create", *hmac_template("HmacSha256", 256))
        for made in (no_mac, aes, hmac256):
            assert made.ok and c.one("Activate", uid(made.uid())).ok
        data = t.byte_string("Data", b"x")
        assert c.one("Mac", uid(no_mac.uid()), data).reason == "PermissionDenied"
        assert c.one("Mac", uid(aes.uid()), data).reason == "InvalidField"
        assert c.one("Mac", uid(hmac256.uid()), _params("HmacSha512"), data).reason == "InvalidField"
        assert c.one("Mac", uid(hmac256.uid()), _params("Aes"), data).reason == "InvalidField"
        before = _count(c)
        bad_payloads = {
            "MissingData": [],
            "InvalidField": [t.text("Data", "text, not bytes")],
        }
        for reason, payload in bad_payloads.items():
            assert c.one("Mac", uid(hmac256.uid()), *payload).reason == reason
        assert c.one("Mac", uid(hmac256.uid()), t.byte_string("Data", bytes(65537))).reason == "InvalidField"
        assert c.one("Mac", uid(hmac256.uid()), data, t.byte_string("CorrelationValue", b"1")).reason == (
            "FeatureNotSupported"
        )
        assert c.one("Mac", uid(hmac256.uid()), data, t.integer("CryptographicParameters", 1)).reason == "InvalidField"
        assert c.one("MacVerify", uid(hmac256.uid()), data).reason == "MissingData"
        assert c.one("MacVerify", uid(hmac256.uid()), data, t.byte_string("MacData", bytes(65))).reason == (
            "InvalidField"
        )
        for algorithm, bits in (("HmacSha256", 128), ("HmacSha256", 1024), ("HmacSha512", 256), ("HmacSha1", 160),
                                ("HmacSha256", 260)):  # fmt: skip
            assert c.one("Create", *hmac_template(algorithm, bits)).reason == "InvalidField", (algorithm, bits)
        assert _count(c) == before


def test_policy_decides_mac(site: KmipSite) -> None:
    policy = """@id("no-mac-for-esx-2")
forbid (principal, action == Keysteward::Action::"kmip_mac", resource is Keysteward::KmipObject)
when { principal.name == "esx-2" };"""
    with site.server.http(site.admin) as h:
        assert h.put("/policy", json={"sources": {"no-mac.cedar": policy}}).status_code == 200
    one, two = site.issue("esx-1")[:2], site.issue("esx-2")[:2]
    with KmipConn(site.port, site.tls(one)) as c:
        kid = c.one("Create", *hmac_template()).uid()
        assert c.one("Activate", uid(kid)).ok
        assert c.one("Mac", uid(kid), t.byte_string("Data", b"x")).ok
    with KmipConn(site.port, site.tls(two)) as c:
        assert c.one("Mac", uid(kid), t.byte_string("Data", b"x")).reason == "PermissionDenied"
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-2", token=site.admin)
    assert [r["reason"] for r in records if r["action"] == "kmip.mac"] == ["forbidden_by_policy"]


def test_rng_retrieve_and_seed(site: KmipSite) -> None:
    cert = site.issue("esx-1")[:2]
    with KmipConn(site.port, site.tls(cert)) as c:
        first = c.one("RngRetrieve", t.integer("DataLength", 32))
        second = c.one("RngRetrieve", t.integer("DataLength", 4096))
        assert first.ok and second.ok
        a = first.payload.first("Data").value  # type: ignore[union-attr]
        b = second.payload.first("Data").value  # type: ignore[union-attr]
        assert len(a) == 32 and len(b) == 4096 and a != b[:32]  # type: ignore[arg-type,index]
        assert c.one("RngRetrieve", t.integer("DataLength", 4097)).reason == "InvalidField"
        assert c.one("RngRetrieve", t.integer("DataLength", 0)).reason == "InvalidField"
        assert c.one("RngRetrieve", t.integer("DataLength", -1)).reason == "InvalidField"
        assert c.one("RngRetrieve", t.text("DataLength", "32")).reason == "InvalidField"
        assert c.one("RngRetrieve").reason == "MissingData"
        seeded = c.one("RngSeed", t.byte_string("Data", b"client entropy"))
        assert seeded.ok and seeded.payload.first("DataLength").value == 0  # type: ignore[union-attr]
        assert c.one("RngSeed").reason == "MissingData"
        assert c.one("RngSeed", t.byte_string("Data", bytes(4097))).reason == "InvalidField"
        assert c.one("Query", t.enumeration("QueryFunction", 1)).ok  # the connection is still up
