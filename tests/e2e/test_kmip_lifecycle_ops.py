"""Issue 12: Check, ReKey, AdjustAttribute (KMIP 2.1) and Get of a key wrapped under another KMIP key, on a
real KMIP listener.

- Check passes for a usage mask the key holds, fails (audited, nothing changed) for one it lacks or a lease
  longer than the server's; bad fields answer Invalid Field;
- ReKey makes a new key with new material of the same algorithm and length, moves the Name, links the two
  both ways (Replacement / Replaced Object), keeps the old key's state; an Offset sets the new Activation
  Date (so the new key is Pre-Active); a destroyed key is not rekeyed;
- AdjustAttribute increments and negates a client's attribute in 2.1, refuses a server attribute, a text
  value and 1.4 (Operation Not Supported);
- a batch with Batch Order Option runs in order; a non-boolean option is an Invalid Message;
- Get with a Key Wrapping Specification answers RFC 3394 / RFC 5649 wrapped material that unwraps to what a
  plain Get answers; a Pre-Active wrapping key, an unknown one, a policy that forbids kmip_wrap, and bad
  specifications are refused, and the material never appears unwrapped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_unwrap_with_padding

from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import OBJECT_TYPE
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn, aes_256_template, attribute, text, uid
from tests.support.kmip_site import KmipSite, make_kmip_site

pytestmark = pytest.mark.e2e
ENCRYPT, DECRYPT, WRAP_KEY = 0x04, 0x08, 0x10


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(tmp_path, server_factory, secret_registry)


def _material(c: KmipConn, kid: str) -> bytes:
    got = c.one("Get", uid(kid))
    assert got.ok, got.reason
    block = got.payload.first("SymmetricKey").first("KeyBlock")  # type: ignore[union-attr]
    return bytes(block.first("KeyValue").first("KeyMaterial").value)  # type: ignore[union-attr,arg-type]


def _attrs(c: KmipConn, kid: str) -> dict[str, list[t.Item]]:
    answer = c.one("GetAttributes", uid(kid))
    assert answer.ok, answer.reason
    return answer.attributes()


def test_check(site: KmipSite) -> None:
    cert = site.issue("esx-1")[:2]
    with KmipConn(site.port, site.tls(cert)) as c:
        kid = c.one("Create", *aes_256_template()).uid()  # usage mask Encrypt | Decrypt
        before = _attrs(c, kid)
        assert c.one("Check", uid(kid), t.integer("CryptographicUsageMask", ENCRYPT)).ok
        assert c.one("Check", uid(kid), t.integer("CryptographicUsageMask", ENCRYPT | DECRYPT),
                     t.interval("LeaseTime", 60), t.long_integer("UsageLimitsCount", 10)).ok  # fmt: skip
        assert c.one("Check", uid(kid), t.integer("CryptographicUsageMask", WRAP_KEY)).reason == "IllegalOperation"
        assert c.one("Check", uid(kid), t.interval("LeaseTime", 86400)).reason == "IllegalOperation"
        assert c.one("Check", uid(kid), t.text("CryptographicUsageMask", "Encrypt")).reason == "InvalidField"
        assert c.one("Check", uid(kid), t.integer("CryptographicUsageMask", -1)).reason == "InvalidField"
        assert c.one("Check", uid(kid), t.integer("LeaseTime", 5)).reason == "InvalidField"
        assert c.one("Check", uid("no-such-key")).reason == "ItemNotFound"
        after = _attrs(c, kid)
        assert before == after
    with KmipConn(site.port, site.tls(cert), version=(2, 1)) as c:
        failed = c.one("Check", uid(kid), t.integer("CryptographicUsageMask", WRAP_KEY))
        assert failed.reason == "IncompatibleCryptographicUsageMask"
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-1", token=site.admin)
    reasons = sorted(r.get("reason") or "" for r in records if r["action"] == "kmip.check")
    assert reasons == ["", "", "kmip_check_failed", "kmip_check_failed", "kmip_check_lease", "kmip_not_found"]


def test_rekey(site: KmipSite, secret_registry: SecretRegistry) -> None:
    cert = site.issue("esx-1")[:2]
    name = t.struct_("AttributeValue", t.text("NameValue", "vm-9-disk"), t.enumeration("NameType", 1))
    with KmipConn(site.port, site.tls(cert)) as c:
        kid = c.one("Create", *aes_256_template()).uid()
        assert c.one("AddAttribute", uid(kid), attribute("Name", name)).ok
        assert c.one("AddAttribute", uid(kid), attribute("Name", name)).reason == "InvalidField"  # the same Name twice
        assert c.one("AddAttribute", uid(kid), attribute("x-Component", text("Virtual Machine"))).ok
        assert c.one("Activate", uid(kid)).ok
        old_key = _material(c, kid)
        secret_registry.secret(old_key, "kmip key before rekey")
        renewed = c.one("Rekey", uid(kid))
        assert renewed.ok, renewed.reason
        new = renewed.uid()
        new_key = _material(c, new)
        secret_registry.secret(new_key, "kmip key after rekey")
        assert new != kid and len(new_key) == 32 and new_key != old_key
        old_attrs, new_attrs = _attrs(c, kid), _attrs(c, new)
        assert [(v.first("LinkType").value, v.first("LinkedObjectIdentifier").value)  # type: ignore[union-attr]
                for v in old_attrs["Link"]] == [(0x106, new)]  # fmt: skip
        assert [(v.first("LinkType").value, v.first("LinkedObjectIdentifier").value)  # type: ignore[union-attr]
                for v in new_attrs["Link"]] == [(0x107, kid)]  # fmt: skip
        assert "Name" not in old_attrs and new_attrs["Name"][0].first("NameValue").value == "vm-9-disk"  # type: ignore[union-attr]
        assert new_attrs["x-Component"][0].value == "Virtual Machine"
        # no Offset: the Activation Date is copied, so the new key is Active at once (KMIP)
        assert new_attrs["Cryptographic Length"][0].value == 256 and new_attrs["State"][0].value == 2
        assert old_attrs["State"][0].value == 2  # the old key stays Active
        located = c.one("Locate", attribute("Name", name))
        assert [i.value for i in located.payload.all("UniqueIdentifier")] == [new]  # type: ignore[union-attr]

        later = c.one("Rekey", uid(new), t.interval("Offset", 3600))
        assert later.ok and _attrs(c, later.uid())["State"][0].value == 1  # activates in an hour: Pre-Active
        count = len(c.one("Locate").payload.all("UniqueIdentifier"))  # type: ignore[union-attr]
        assert c.one("Rekey", uid(new), t.integer("Offset", 5)).reason == "InvalidField"
        assert c.one("Rekey", uid(new), t.interval("Offset", 2**31)).reason == "InvalidField"
        template = t.struct_("TemplateAttribute", attribute("Cryptographic Length", t.integer("AttributeValue", 128)))
        assert c.one("Rekey", uid(new), template).reason == "InvalidField"
        assert c.one("Rekey", uid("no-such-key")).reason == "ItemNotFound"
        assert len(c.one("Locate").payload.all("UniqueIdentifier")) == count  # type: ignore[union-attr]
        revoke = t.struct_("RevocationReason", t.enumeration("RevocationReasonCode", 5))
        assert c.one("Revoke", uid(kid), revoke).ok and c.one("Destroy", uid(kid)).ok
        assert c.one("Rekey", uid(kid)).reason == "PermissionDenied"


def test_adjust_attribute(site: KmipSite) -> None:
    cert = site.issue("esx-1")[:2]
    with KmipConn(site.port, site.tls(cert)) as c:
        kid = c.one("Create", *aes_256_template()).uid()
        assert c.one("AddAttribute", uid(kid), attribute("x-Count", t.integer("AttributeValue", 5))).ok
        assert c.one("AddAttribute", uid(kid), attribute("x-Name", text("vm-1"))).ok
        assert c.one("AdjustAttribute").reason == "OperationNotSupported"  # a KMIP 2 operation
    vendor = t.struct_("AttributeReference", t.text("VendorIdentification", "x"), t.text("AttributeName", "Count"))
    name_ref = t.struct_("AttributeReference", t.text("VendorIdentification", "x"), t.text("AttributeName", "Name"))
    with KmipConn(site.port, site.tls(cert), version=(2, 1)) as c:
        assert c.one("AdjustAttribute", uid(kid), vendor, t.enumeration("AdjustmentType", 1),
                     t.integer("AdjustmentValue", 10)).ok  # fmt: skip
        assert c.one("AdjustAttribute", uid(kid), vendor, t.enumeration("AdjustmentType", 3)).ok
        assert c.one("AdjustAttribute", uid(kid), vendor, t.enumeration("AdjustmentType", 2)).ok
        for bad, reason in (
            ((vendor, t.enumeration("AdjustmentType", 9)), "InvalidField"),
            ((vendor, t.integer("AdjustmentType", 1)), "InvalidField"),
            ((vendor,), "InvalidField"),
            ((t.enumeration("AdjustmentType", 1),), "MissingData"),
            ((name_ref, t.enumeration("AdjustmentType", 1)), "InvalidAttributeValue"),
            ((vendor, t.enumeration("AdjustmentType", 1), t.text("AdjustmentValue", "1")), "InvalidAttributeValue"),
            ((vendor, t.enumeration("AdjustmentType", 2), t.integer("AdjustmentValue", 2**31 - 1)),
             "InvalidAttributeValue"),
            ((t.enumeration("AttributeReference", t.TAGS["State"]), t.enumeration("AdjustmentType", 1)),
             "AttributeReadOnly"),
        ):  # fmt: skip
            assert c.one("AdjustAttribute", uid(kid), *bad).reason == reason, bad
    with KmipConn(site.port, site.tls(cert)) as c:
        attrs = _attrs(c, kid)
        assert attrs["x-Count"][0].value == -16 and attrs["x-Name"][0].value == "vm-1"


def _spec(wrapping: str, mode: int | None = None, method: int = 1) -> t.Item:
    params = t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", mode)) if mode else None
    return t.struct_("KeyWrappingSpecification", t.enumeration("WrappingMethod", method),
                     t.struct_("EncryptionKeyInformation", uid(wrapping), params))  # fmt: skip


def test_get_wrapped(site: KmipSite, secret_registry: SecretRegistry) -> None:
    cert = site.issue("esx-1")[:2]
    wrap_template = aes_256_template()
    wrap_template[1] = t.struct_(
        "TemplateAttribute",
        attribute("Cryptographic Algorithm", t.enumeration("AttributeValue", 3)),
        attribute("Cryptographic Length", t.integer("AttributeValue", 256)),
        attribute("Cryptographic Usage Mask", t.integer("AttributeValue", WRAP_KEY)),
    )
    with KmipConn(site.port, site.tls(cert)) as c:
        kid = c.one("Create", *aes_256_template()).uid()
        kek = c.one("Create", *wrap_template).uid()
        plain_kek = c.one("Create", *aes_256_template()).uid()  # no Wrap Key in its mask
        secret = c.one("Register", t.enumeration("ObjectType", OBJECT_TYPE["SecretData"]), t.struct_(
            "SecretData", t.enumeration("SecretDataType", 1), t.struct_(
                "KeyBlock", t.enumeration("KeyFormatType", 2),
                t.struct_("KeyValue", t.byte_string("KeyMaterial", b"odd-length-pass"))))).uid()  # fmt: skip
        assert c.one("Get", uid(kid), _spec(kek)).reason == "PermissionDenied"  # the wrapping key is Pre-Active
        assert c.one("Activate", uid(kek)).ok and c.one("Activate", uid(plain_kek)).ok
        key, wrapping = _material(c, kid), _material(c, kek)
        secret_registry.secret(key, "kmip key to wrap")
        secret_registry.secret(wrapping, "kmip wrapping key")
        for mode, unwrap in ((None, aes_key_unwrap), (0x0D, aes_key_unwrap), (0x0C, aes_key_unwrap_with_padding)):
            got = c.one("Get", uid(kid), _spec(kek, mode))
            assert got.ok, got.reason
            block = got.payload.first("SymmetricKey").first("KeyBlock")  # type: ignore[union-attr]
            wrapped = block.first("KeyValue").value  # type: ignore[union-attr]
            assert isinstance(wrapped, bytes) and key not in wrapped
            assert unwrap(wrapping, wrapped) == key
            info = block.first("KeyWrappingData").first("EncryptionKeyInformation")  # type: ignore[union-attr]
            assert info.first("UniqueIdentifier").value == kek  # type: ignore[union-attr]
        padded = c.one("Get", uid(secret), _spec(kek, 0x0C))
        assert padded.ok, padded.reason
        assert c.one("Get", uid(secret), _spec(kek, 0x0D)).reason == "InvalidField"  # 15 bytes: RFC 3394 cannot
        for spec, reason in (
            (_spec(plain_kek), "PermissionDenied"),
            (_spec("no-such-key"), "ItemNotFound"),
            (_spec(kek, 0x01), "InvalidField"),
            (_spec(kek, method=2), "FeatureNotSupported"),
            (t.struct_("KeyWrappingSpecification", t.enumeration("WrappingMethod", 1)), "MissingData"),
            (t.integer("KeyWrappingSpecification", 1), "InvalidField"),
            (t.struct_("KeyWrappingSpecification", t.enumeration("WrappingMethod", 1), t.struct_(
                "EncryptionKeyInformation", t.integer("UniqueIdentifier", 7))), "InvalidField"),
        ):  # fmt: skip
            assert c.one("Get", uid(kid), spec).reason == reason, spec
    policy = """@id("no-wrapping")
forbid (principal, action == Keysteward::Action::"kmip_wrap", resource is Keysteward::KmipObject);"""
    with site.server.http(site.admin) as h:
        assert h.put("/policy", json={"sources": {"no-wrap.cedar": policy}}).status_code == 200
    with KmipConn(site.port, site.tls(cert)) as c:
        assert c.one("Get", uid(kid), _spec(kek)).reason == "PermissionDenied"
        assert c.one("Get", uid(kid)).ok  # a plain Get is still permitted
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-1", token=site.admin)
    wrapped_gets = [r for r in records if r["action"] == "kmip.get_wrapped"]
    assert [r.get("reason") for r in wrapped_gets][-1] == "forbidden_by_policy"
    assert key.hex() not in str(records)


def test_batch_order_option(site: KmipSite) -> None:
    """A batch with Batch Order Option True runs in the order sent (Create, then Activate and GetAttributes of
    the ID placeholder); a non-boolean option answers Invalid Message, nothing is created, the connection stays."""
    from tests.support.kmip_client import batch_item

    def message(order: t.Item, *items: t.Item) -> bytes:
        version = t.struct_(
            "ProtocolVersion", t.integer("ProtocolVersionMajor", 1), t.integer("ProtocolVersionMinor", 4)
        )
        header = t.struct_("RequestHeader", version, order, t.integer("BatchCount", len(items)))
        return t.encode(t.struct_("RequestMessage", header, *items))

    cert = site.issue("esx-1")[:2]
    batch = (batch_item("Create", *aes_256_template(), batch_id=b"1"), batch_item("Activate", batch_id=b"2"),
             batch_item("GetAttributes", batch_id=b"3"))  # fmt: skip
    with KmipConn(site.port, site.tls(cert)) as c:
        before = len(c.one("Locate").payload.all("UniqueIdentifier"))  # type: ignore[union-attr]
        answer = t.decode(c.send_raw(message(t.boolean("BatchOrderOption", True), *batch)))
        items = answer.all("BatchItem")
        assert [i.first("UniqueBatchItemId").value for i in items] == [b"1", b"2", b"3"]  # type: ignore[union-attr]
        assert all(i.first("ResultStatus").value == 0 for i in items)  # type: ignore[union-attr]
        state = [a for a in items[2].first("ResponsePayload").all("Attribute")  # type: ignore[union-attr]
                 if a.first("AttributeName").value == "State"]  # type: ignore[union-attr]  # fmt: skip
        assert state[0].first("AttributeValue").value == 2  # type: ignore[union-attr]  # Active: Activate ran second
        refused = t.decode(c.send_raw(message(t.integer("BatchOrderOption", 1), *batch)))
        assert refused.first("BatchItem").first("ResultReason").value == 4  # type: ignore[union-attr]
        assert len(c.one("Locate").payload.all("UniqueIdentifier")) == before + 1  # type: ignore[union-attr]
