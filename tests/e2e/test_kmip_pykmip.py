"""Issue 12: PyKMIP 0.11 (the peer vendors test against) drives a real ``keysteward server start`` KMIP listener.

ProxyKmipClient create, register, get, get_attributes, get_attribute_list, activate, locate, revoke, destroy;
KMIPProxy discover_versions and query. Every key is read back from keysteward's own audit log: each
operation is recorded with the client certificate's identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_site import KmipSite, make_kmip_site

pytestmark = pytest.mark.e2e
kmip = pytest.importorskip("kmip")
from kmip import enums  # noqa: E402
from kmip.pie import objects  # noqa: E402
from kmip.pie.exceptions import KmipOperationFailure  # noqa: E402


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(tmp_path, server_factory, secret_registry)


def test_pykmip_lifecycle(site: KmipSite, secret_registry: SecretRegistry) -> None:
    cert, key, _ = site.issue("esx-1")
    with site.pykmip((cert, key)) as client:
        uid = client.create(enums.CryptographicAlgorithm.AES, 256, name="vm-disk-1")
        fetched = client.get(uid)
        assert isinstance(fetched, objects.SymmetricKey) and len(fetched.value) == 32
        secret_registry.secret(fetched.value, "kmip created key")
        assert fetched.cryptographic_algorithm == enums.CryptographicAlgorithm.AES
        got_uid, attributes = client.get_attributes(uid, ["State", "Cryptographic Length", "Name"])
        assert got_uid == uid
        by_name = {a.attribute_name.value: a.attribute_value for a in attributes}
        assert by_name["State"].value == enums.State.PRE_ACTIVE
        assert by_name["Cryptographic Length"].value == 256
        assert by_name["Name"].name_value.value == "vm-disk-1"
        assert "Initial Date" in client.get_attribute_list(uid)

        material = bytes(range(1, 17))
        registered = client.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 128, material, name="imp"))
        assert client.get(registered).value == material
        secret_registry.secret(material + material, "not a real secret: keeps the registry's 16-byte floor")

        client.activate(uid)
        assert client.locate(attributes=[_name("vm-disk-1")]) == [uid]
        active = client.locate(attributes=[_state(enums.State.ACTIVE)])
        assert active == [uid]
        assert client.locate(maximum_items=1, offset_items=1) == [registered]

        with pytest.raises(KmipOperationFailure) as failed:
            client.destroy(uid)  # an Active key is revoked first
        assert failed.value.reason == enums.ResultReason.PERMISSION_DENIED
        client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
        client.destroy(uid)
        with pytest.raises(KmipOperationFailure) as gone:
            client.get(uid)
        assert gone.value.reason == enums.ResultReason.PERMISSION_DENIED
        _, attributes = client.get_attributes(uid, ["State"])
        assert attributes[0].attribute_value.value == enums.State.DESTROYED
        assert client.get(registered).value == material  # the other object is untouched

    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/*", token=site.admin)
    actions = [r["action"] for r in records]
    for action in ("kmip.create", "kmip.register", "kmip.get", "kmip.activate", "kmip.revoke", "kmip.destroy"):
        assert action in actions
    refused = [r for r in records if r["action"] == "kmip.destroy" and r["outcome"] == "denied"]
    assert refused and refused[0]["reason"] == "kmip_wrong_state"


def test_pykmip_discover_versions_and_query(site: KmipSite) -> None:
    cert, key, _ = site.issue("esx-1")
    with site.pykmip((cert, key)) as client:
        proxy = client.proxy
        versions = proxy.discover_versions().protocol_versions
        assert [(v.major, v.minor) for v in versions][:2] == [(1, 4), (1, 3)]
        result = proxy.query(query_functions=[enums.QueryFunction.QUERY_OPERATIONS,
                                              enums.QueryFunction.QUERY_SERVER_INFORMATION])  # fmt: skip
        ops = set(result.operations)
        assert {enums.Operation.CREATE, enums.Operation.GET, enums.Operation.LOCATE} <= ops
        assert result.vendor_identification == "keysteward"


def _name(value: str) -> object:
    from kmip.core.factories.attributes import AttributeFactory

    return AttributeFactory().create_attribute(enums.AttributeType.NAME, value)


def _state(state: enums.State) -> object:
    from kmip.core.factories.attributes import AttributeFactory

    return AttributeFactory().create_attribute(enums.AttributeType.STATE, state)


def test_kek_rotation_rewraps_kmip_objects(site: KmipSite, secret_registry: SecretRegistry) -> None:
    """KMIP material is a data key of the tenant's kmip KEK: a rotation rewraps it, Get serves the same bytes,
    and destroying the old version afterwards loses nothing."""
    cert, key, _ = site.issue("esx-1")
    with site.pykmip((cert, key)) as client:
        uid = client.create(enums.CryptographicAlgorithm.AES, 128)
        before = client.get(uid).value
        secret_registry.secret(before + before, "kmip key (doubled to the registry's floor)")
        site.server.cli("key", "rotate", "kmip", token=site.admin)
        deadline = time.monotonic() + 30
        while True:
            versions = site.server.cli_json("key", "describe", "kmip", token=site.admin)["versions"]
            if versions[0]["data_keys"] == 0 and versions[1]["data_keys"] == 1:
                break
            assert time.monotonic() < deadline, versions
            time.sleep(0.2)
        site.server.cli("key", "destroy-version", "kmip", "1", "--yes", token=site.admin)
        assert client.get(uid).value == before


def test_encrypt_and_decrypt(site: KmipSite) -> None:
    """PyKMIP's encrypt/decrypt (AES-CBC, PKCS#5), AES-GCM with additional data over keysteward's own client;
    only an Active key is used, and a tampered GCM message does not decrypt."""
    from keysteward.formats import kmip_ttlv as t
    from tests.support.kmip_client import KmipConn, uid

    cert, key, _ = site.issue("esx-1")
    cbc = {"block_cipher_mode": enums.BlockCipherMode.CBC, "padding_method": enums.PaddingMethod.PKCS5,
           "cryptographic_algorithm": enums.CryptographicAlgorithm.AES}  # fmt: skip
    with site.pykmip((cert, key)) as client:
        kid = client.create(enums.CryptographicAlgorithm.AES, 256)
        with pytest.raises(KmipOperationFailure) as early:
            client.encrypt(b"pre-active", uid=kid, cryptographic_parameters=cbc)
        assert early.value.reason == enums.ResultReason.PERMISSION_DENIED  # a Pre-Active key is not used
        client.activate(kid)
        sealed, iv = client.encrypt(b"the quick brown fox", uid=kid, cryptographic_parameters=cbc)
        assert len(iv) == 16 and len(sealed) == 32 and b"quick" not in sealed
        assert client.decrypt(sealed, uid=kid, cryptographic_parameters=cbc, iv_counter_nonce=iv) == (
            b"the quick brown fox"
        )
    gcm = t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", 9))
    with KmipConn(site.port, site.tls((cert, key))) as c:
        aad = t.byte_string("AuthenticatedEncryptionAdditionalData", b"vm-7")
        out = c.one("Encrypt", uid(kid), gcm, t.byte_string("Data", b"disk key"), aad)
        assert out.ok and out.payload is not None
        data, nonce, tag = (
            out.payload.first(n).value for n in ("Data", "IvCounterNonce", "AuthenticatedEncryptionTag")
        )  # type: ignore[union-attr]
        back = c.one("Decrypt", uid(kid), gcm, t.byte_string("Data", data), t.byte_string("IvCounterNonce", nonce),
                     aad, t.byte_string("AuthenticatedEncryptionTag", tag))  # type: ignore[arg-type]  # fmt: skip
        assert back.payload.first("Data").value == b"disk key"  # type: ignore[union-attr]
        tampered = c.one("Decrypt", uid(kid), gcm, t.byte_string("Data", data), t.byte_string("IvCounterNonce", nonce),
                         t.byte_string("AuthenticatedEncryptionAdditionalData", b"vm-8"),
                         t.byte_string("AuthenticatedEncryptionTag", tag))  # type: ignore[arg-type]  # fmt: skip
        assert tampered.reason == "CryptographicFailure"
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-1", token=site.admin)
    uses = [r for r in records if r["action"] in ("kmip.encrypt", "kmip.decrypt")]
    assert [r["outcome"] for r in uses][:1] == ["error"] and len(uses) == 6


def test_pykmip_mac(site: KmipSite) -> None:
    """PyKMIP's mac with an HMAC-SHA256 key keysteward created: the MAC is HMAC-SHA256 of the data under the key
    Get returns; a Pre-Active key is not used; the MAC is audited, the data and the MAC are not."""
    import hashlib
    import hmac

    cert, key, _ = site.issue("esx-1")
    masks = [enums.CryptographicUsageMask.MAC_GENERATE, enums.CryptographicUsageMask.MAC_VERIFY]
    with site.pykmip((cert, key)) as client:
        kid = client.create(enums.CryptographicAlgorithm.HMAC_SHA256, 256, cryptographic_usage_mask=masks)
        with pytest.raises(KmipOperationFailure) as early:
            client.mac(b"vm-7 config", uid=kid, algorithm=enums.CryptographicAlgorithm.HMAC_SHA256)
        assert early.value.reason == enums.ResultReason.PERMISSION_DENIED
        client.activate(kid)
        got_uid, mac = client.mac(b"vm-7 config", uid=kid, algorithm=enums.CryptographicAlgorithm.HMAC_SHA256)
        material = client.get(kid).value
        assert got_uid == kid and len(material) == 32
        assert mac == hmac.new(material, b"vm-7 config", hashlib.sha256).digest()
        with pytest.raises(KmipOperationFailure) as other:  # the key is HMAC-SHA256, not SHA-512
            client.mac(b"x", uid=kid, algorithm=enums.CryptographicAlgorithm.HMAC_SHA512)
        assert other.value.reason == enums.ResultReason.INVALID_FIELD
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-1", token=site.admin)
    macs = [r for r in records if r["action"] == "kmip.mac"]
    assert sorted(r.get("outcome", "ok") for r in macs) == ["error", "error", "ok"], macs
    assert mac.hex() not in str(records) and "vm-7 config" not in str(records)
