"""Issue 12: Register and Get of public keys, private keys and X.509 certificates; the export rules
(Sensitive, Extractable); Encrypt/Decrypt's modes and the key's own rules, on a real KMIP listener.

- a PKCS#8 private key and an X.509 public key come back byte for byte in their format; a certificate comes
  back with its Certificate Length and Subject CN stated by the server (a client cannot set them);
- bad registrations (no key block, a format not stored, material that does not fit its format, garbage as a
  certificate, a PGP certificate) answer the Result Reason and store nothing;
- a Sensitive key is not answered in the clear (only wrapped); a key with Extractable false not at all;
- ECB, CBC without padding, a GCM tag of 12 bytes, the key's stored Cryptographic Parameters when the request
  names none; a usage mask without Encrypt, a Protect Stop Date past; bad Cryptographic Parameters;
- Usage Limits counted down by Encrypt in the audit record's transaction, refused once spent, malformed
  limits refused at Create;
- ChaCha20-Poly1305 with a full and a truncated tag, tampering, nonces and tags of the wrong size;
- the tenant's KMIP KEK disabled, then destroyed: Encrypt, Decrypt and Get of an Active key refused at once,
  each audited with its reason.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import KEY_FORMAT_TYPE, OBJECT_TYPE
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn, attribute, uid
from tests.support.kmip_site import KmipSite, make_kmip_site

pytestmark = pytest.mark.e2e


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(tmp_path, server_factory, secret_registry)


def _key(kind: str, fmt: str, material: t.Item, *attrs: t.Item) -> list[t.Item]:
    block = t.struct_("KeyBlock", t.enumeration("KeyFormatType", KEY_FORMAT_TYPE[fmt]), t.struct_("KeyValue", material),
                      t.enumeration("CryptographicAlgorithm", 6), t.integer("CryptographicLength", 256))  # fmt: skip
    return [t.enumeration("ObjectType", OBJECT_TYPE[kind]), t.struct_("TemplateAttribute", *attrs),
            t.struct_(kind, block)]  # fmt: skip


def _count(c: KmipConn) -> int:
    return len(c.one("Locate").payload.all("UniqueIdentifier"))  # type: ignore[union-attr]


def _certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "esx-7.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))  # fmt: skip
    return cert.public_bytes(serialization.Encoding.DER)


def test_keys_and_certificates(site: KmipSite, secret_registry: SecretRegistry) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())  # fmt: skip
    spki = private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    secret_registry.secret(pkcs8, "registered private key")
    der = _certificate()
    cert = site.issue("esx-1")[:2]
    with KmipConn(site.port, site.tls(cert)) as c:
        priv = c.one("Register", *_key("PrivateKey", "Pkcs8", t.byte_string("KeyMaterial", pkcs8)))
        pub = c.one("Register", *_key("PublicKey", "X509", t.byte_string("KeyMaterial", spki)))
        made = c.one("Register", t.enumeration("ObjectType", OBJECT_TYPE["Certificate"]), t.struct_(
            "Certificate", t.enumeration("CertificateType", 1), t.byte_string("CertificateValue", der)))  # fmt: skip
        assert priv.ok and pub.ok and made.ok, (priv.reason, pub.reason, made.reason)
        for got_uid, kind, body in ((priv.uid(), "PrivateKey", pkcs8), (pub.uid(), "PublicKey", spki)):
            block = c.one("Get", uid(got_uid)).payload.first(kind).first("KeyBlock")  # type: ignore[union-attr]
            assert block.first("KeyValue").first("KeyMaterial").value == body  # type: ignore[union-attr]
            assert block.first("KeyFormatType").value in (KEY_FORMAT_TYPE["Pkcs8"], KEY_FORMAT_TYPE["X509"])  # type: ignore[union-attr]
        served = c.one("Get", uid(made.uid())).payload.first("Certificate")  # type: ignore[union-attr]
        assert served.first("CertificateValue").value == der  # type: ignore[union-attr]
        stated = c.one("GetAttributes", uid(made.uid())).attributes()
        assert stated["Certificate Length"][0].value == len(der)
        assert stated["Certificate Subject Cn"][0].value == "esx-7.example"
        assert not any(name.startswith("_") for name in stated)  # hidden bookkeeping never shows
        lie = attribute("Certificate Length", t.integer("AttributeValue", 5))
        assert c.one("ModifyAttribute", uid(made.uid()), lie).reason == "PermissionDenied"

        before = _count(c)
        bad = [
            ([t.enumeration("ObjectType", OBJECT_TYPE["PublicKey"])], "MissingData"),
            ([t.enumeration("ObjectType", OBJECT_TYPE["PublicKey"]), t.struct_("PublicKey")], "MissingData"),
            (_key("PublicKey", "Pkcs8", t.byte_string("KeyMaterial", spki)), "KeyFormatTypeNotSupported"),
            (_key("PrivateKey", "Pkcs8", t.struct_("KeyMaterial", t.big_integer("Modulus", 7))), "InvalidField"),
            (_key("PrivateKey", "TransparentRsaPrivateKey", t.byte_string("KeyMaterial", b"x")), "InvalidField"),
            (_key("PrivateKey", "Pkcs8", t.byte_string("KeyMaterial", bytes(9000))), "InvalidField"),
            ([t.enumeration("ObjectType", OBJECT_TYPE["Certificate"]), t.struct_("Certificate", t.enumeration(
                "CertificateType", 1), t.byte_string("CertificateValue", b"not a certificate"))], "InvalidField"),
            ([t.enumeration("ObjectType", OBJECT_TYPE["Certificate"]), t.struct_("Certificate", t.enumeration(
                "CertificateType", 2), t.byte_string("CertificateValue", der))], "InvalidField"),
            ([t.enumeration("ObjectType", OBJECT_TYPE["Certificate"]), t.struct_("Certificate", t.enumeration(
                "CertificateType", 1), t.text("CertificateValue", "PEM?"))], "InvalidField"),
        ]  # fmt: skip
        for payload, reason in bad:
            assert c.one("Register", *payload).reason == reason, payload
        assert _count(c) == before


def _aes(*extra: t.Item, mask: int = 0x0C) -> list[t.Item]:
    return [
        t.enumeration("ObjectType", OBJECT_TYPE["SymmetricKey"]),
        t.struct_(
            "TemplateAttribute",
            attribute("Cryptographic Algorithm", t.enumeration("AttributeValue", 3)),
            attribute("Cryptographic Length", t.integer("AttributeValue", 128)),
            attribute("Cryptographic Usage Mask", t.integer("AttributeValue", mask)),
            attribute("Activation Date", t.date_time("AttributeValue", 1)),  # in the past: Active at once
            *extra,
        ),
    ]


def _material(c: KmipConn, kid: str) -> bytes:
    block = c.one("Get", uid(kid)).payload.first("SymmetricKey").first("KeyBlock")  # type: ignore[union-attr]
    return bytes(block.first("KeyValue").first("KeyMaterial").value)  # type: ignore[union-attr,arg-type]


def test_export_rules(site: KmipSite) -> None:
    cert = site.issue("esx-1")[:2]
    with KmipConn(site.port, site.tls(cert)) as c:
        sensitive = c.one("Create", *_aes(attribute("Sensitive", t.boolean("AttributeValue", True)))).uid()
        sealed = c.one("Create", *_aes(attribute("Extractable", t.boolean("AttributeValue", False)))).uid()
        kek = c.one("Create", *_aes(mask=0x10)).uid()
        fresh = c.one("Create", *_aes(attribute("Fresh", t.boolean("AttributeValue", True))))
        assert fresh.ok and c.one("GetAttributes", uid(fresh.uid())).attributes()["Fresh"][0].value is True
        stale = c.one("Create", *_aes(attribute("Fresh", t.boolean("AttributeValue", False))))
        assert stale.reason == "PermissionDenied"  # Fresh is the server's to state: true until the first Get
        assert c.one("Get", uid(sensitive)).reason == "PermissionDenied"
        spec = t.struct_("KeyWrappingSpecification", t.enumeration("WrappingMethod", 1),
                         t.struct_("EncryptionKeyInformation", uid(kek)))  # fmt: skip
        assert c.one("Get", uid(sensitive), spec).ok  # wrapped, it may leave
        assert c.one("Get", uid(sealed)).reason == "PermissionDenied"
        assert c.one("Get", uid(sealed), spec).reason == "PermissionDenied"
    with KmipConn(site.port, site.tls(cert), version=(2, 1)) as c:
        assert c.one("Get", uid(sensitive)).reason == "Sensitive"
        assert c.one("Get", uid(sealed)).reason == "NotExtractable"
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-1", token=site.admin)
    reasons = {r.get("reason") for r in records if r["action"] in ("kmip.get", "kmip.get_wrapped")}
    assert {"kmip_sensitive", "kmip_not_extractable"} <= reasons


def test_encrypt_modes_and_key_rules(site: KmipSite, secret_registry: SecretRegistry) -> None:
    cert = site.issue("esx-1")[:2]
    ecb = t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", 2), t.enumeration("PaddingMethod", 1))
    stored_ecb = attribute("Cryptographic Parameters", t.struct_("AttributeValue", t.enumeration("BlockCipherMode", 2)))
    block = bytes(range(16))
    with KmipConn(site.port, site.tls(cert)) as c:
        kid = c.one("Create", *_aes()).uid()
        key = _material(c, kid)
        secret_registry.secret(key + key, "kmip aes key (doubled to the registry's floor)")
        expected = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block)  # noqa: S305 - the test's oracle
        out = c.one("Encrypt", uid(kid), ecb, t.byte_string("Data", block))
        assert out.ok and out.payload.first("Data").value == expected  # type: ignore[union-attr]
        assert c.one("Encrypt", uid(kid), ecb, t.byte_string("Data", block[:15])).reason == "InvalidField"
        by_key = c.one("Create", *_aes(stored_ecb)).uid()
        key2 = _material(c, by_key)
        secret_registry.secret(key2 + key2, "kmip aes key (doubled to the registry's floor)")
        plain = c.one("Encrypt", uid(by_key), t.byte_string("Data", block))  # no parameters: the key's (ECB)
        assert plain.payload.first("Data").value == Cipher(algorithms.AES(key2), modes.ECB()).encryptor().update(block)  # type: ignore[union-attr]  # noqa: S305
        gcm12 = t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", 9), t.integer("TagLength", 12))
        sealed = c.one("Encrypt", uid(kid), gcm12, t.byte_string("Data", b"vm"))
        tag = sealed.payload.first("AuthenticatedEncryptionTag").value  # type: ignore[union-attr]
        assert len(tag) == 12  # type: ignore[arg-type]
        back = c.one("Decrypt", uid(kid), gcm12, sealed.payload.first("Data"),  # type: ignore[union-attr]
                     sealed.payload.first("IvCounterNonce"), t.byte_string("AuthenticatedEncryptionTag", tag))  # type: ignore[union-attr,arg-type]  # fmt: skip
        assert back.ok and back.payload.first("Data").value == b"vm"  # type: ignore[union-attr]

        def limits(*items: t.Item) -> t.Item:
            return attribute("Usage Limits", t.struct_("AttributeValue", *items))

        two_uses = limits(t.long_integer("UsageLimitsTotal", 2), t.enumeration("UsageLimitsUnit", 2))
        limited = c.one("Create", *_aes(two_uses)).uid()
        for _ in range(2):
            assert c.one("Encrypt", uid(limited), ecb, t.byte_string("Data", block)).ok
        assert c.one("Encrypt", uid(limited), ecb, t.byte_string("Data", block)).reason == "PermissionDenied"
        assert c.one("Decrypt", uid(limited), ecb, t.byte_string("Data", block)).ok  # limits count protection only
        left = c.one("GetAttributes", uid(limited)).attributes()["Usage Limits"][0]
        assert left.first("UsageLimitsCount").value == 0  # type: ignore[union-attr]
        for bad in (limits(t.text("UsageLimitsTotal", "2"), t.enumeration("UsageLimitsUnit", 2)),
                    limits(t.long_integer("UsageLimitsTotal", 2)),
                    limits(t.long_integer("UsageLimitsTotal", -1), t.enumeration("UsageLimitsUnit", 1)),
                    limits(t.long_integer("UsageLimitsTotal", 2), t.enumeration("UsageLimitsUnit", 7))):  # fmt: skip
            assert c.one("Create", *_aes(bad)).reason == "InvalidField", bad
        assert c.one("ModifyAttribute", uid(limited), two_uses).reason == "PermissionDenied"  # set at creation only

        decrypt_only = c.one("Create", *_aes(mask=0x08)).uid()
        assert c.one("Encrypt", uid(decrypt_only), ecb, t.byte_string("Data", block)).reason == "PermissionDenied"
        stopped = c.one("Create", *_aes(attribute("Protect Stop Date", t.date_time("AttributeValue", 2)))).uid()
        assert c.one("Encrypt", uid(stopped), ecb, t.byte_string("Data", block)).reason == "PermissionDenied"
        assert c.one("Decrypt", uid(stopped), ecb, t.byte_string("Data", block)).ok  # processing goes on
        for params, reason in (
            (t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", 6)), "InvalidField"),  # CTR
            (t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", 1),
                       t.enumeration("PaddingMethod", 2)), "InvalidField"),  # OAEP
            (t.struct_("CryptographicParameters", t.integer("TagLength", 4)), "GeneralFailure"),
            (t.struct_("CryptographicParameters", t.text("TagLength", "16")), "GeneralFailure"),
            (t.integer("CryptographicParameters", 1), "InvalidField"),
        ):  # fmt: skip
            assert c.one("Encrypt", uid(kid), params, t.byte_string("Data", block)).reason == reason, params
        assert c.one("Decrypt", uid(kid), t.byte_string("Data", block)).reason == "InvalidMessage"  # no IV


def test_chacha20_poly1305(site: KmipSite, secret_registry: SecretRegistry) -> None:
    """A registered ChaCha20-Poly1305 key: Encrypt and Decrypt round-trip, with a full and a 12-byte tag; a
    changed tag or additional data does not decrypt; nonces of the wrong size are refused."""
    import os

    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    material = os.urandom(32)
    secret_registry.secret(material, "registered chacha20-poly1305 key")
    value = t.struct_("KeyValue", t.byte_string("KeyMaterial", material))
    block = t.struct_("KeyBlock", t.enumeration("KeyFormatType", 1), value,
                      t.enumeration("CryptographicAlgorithm", 0x1E), t.integer("CryptographicLength", 256))  # fmt: skip
    template = t.struct_("TemplateAttribute", attribute("Activation Date", t.date_time("AttributeValue", 1)))
    aead = t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", 0x12))
    aead12 = t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", 0x12), t.integer("TagLength", 12))
    aad = t.byte_string("AuthenticatedEncryptionAdditionalData", b"vm-3")
    cert = site.issue("esx-1")[:2]
    with KmipConn(site.port, site.tls(cert)) as c:
        kid = c.one("Register", t.enumeration("ObjectType", OBJECT_TYPE["SymmetricKey"]), template,
                    t.struct_("SymmetricKey", block)).uid()  # fmt: skip
        for params in (aead, aead12):
            out = c.one("Encrypt", uid(kid), params, t.byte_string("Data", b"nvram"), aad)
            assert out.ok, out.reason
            data, nonce, tag = (out.payload.first(n).value for n in ("Data", "IvCounterNonce",  # type: ignore[union-attr]
                                                                     "AuthenticatedEncryptionTag"))  # fmt: skip
            full = ChaCha20Poly1305(material).encrypt(nonce, b"nvram", b"vm-3")  # type: ignore[arg-type]
            assert data == full[:-16] and tag == full[-16:][: len(tag)]  # type: ignore[arg-type,index]
            back = c.one("Decrypt", uid(kid), params, t.byte_string("Data", data), aad,  # type: ignore[arg-type]
                         t.byte_string("IvCounterNonce", nonce), t.byte_string("AuthenticatedEncryptionTag", tag))  # type: ignore[arg-type]  # fmt: skip
            assert back.ok and back.payload.first("Data").value == b"nvram"  # type: ignore[union-attr]
            bad = bytes([tag[0] ^ 1]) + tag[1:]  # type: ignore[index,operator]
            tampered = c.one("Decrypt", uid(kid), params, t.byte_string("Data", data), aad,  # type: ignore[arg-type]
                             t.byte_string("IvCounterNonce", nonce), t.byte_string("AuthenticatedEncryptionTag", bad))  # type: ignore[arg-type]  # fmt: skip
            assert tampered.reason == "CryptographicFailure"
        short = c.one("Encrypt", uid(kid), aead, t.byte_string("Data", b"x"), t.byte_string("IvCounterNonce", bytes(8)))
        assert short.reason == "InvalidField"
        assert c.one("Decrypt", uid(kid), aead, t.byte_string("Data", b"x"), t.byte_string("IvCounterNonce", bytes(12)),
                     t.byte_string("AuthenticatedEncryptionTag", bytes(8))).reason == "InvalidField"  # fmt: skip


def test_the_tenants_kmip_kek_disabled_or_destroyed_ends_every_use_at_once(site: KmipSite) -> None:
    """The tenant's KMIP KEK (key ``kmip``) holds every object's material: disabled, Encrypt, Decrypt and Get
    of an Active key are refused on the next request (the server that made the change forgets its cached
    state at once), enabled again they are served; destroyed, the material is crypto-shredded and no use of
    the key comes back, whichever way it is asked."""
    cert = site.issue("esx-1")[:2]
    block = bytes(range(16))
    ecb = t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", 2), t.enumeration("PaddingMethod", 1))
    with KmipConn(site.port, site.tls(cert)) as c, site.server.http(site.admin) as admin:
        kid = c.one("Create", *_aes()).uid()
        sealed = c.one("Encrypt", uid(kid), ecb, t.byte_string("Data", block))
        assert sealed.ok
        data = sealed.payload.first("Data")  # type: ignore[union-attr]
        assert admin.post("/keys/kmip/disable").status_code == 200
        for operation, *fields in (("Encrypt", ecb, t.byte_string("Data", block)), ("Decrypt", ecb, data), ("Get",)):
            assert c.one(operation, uid(kid), *fields).reason == "PermissionDenied", operation  # type: ignore[arg-type]
        assert admin.post("/keys/kmip/enable").status_code == 200
        assert c.one("Decrypt", uid(kid), ecb, data).payload.first("Data").value == block  # type: ignore[union-attr]
        assert admin.post("/keys/kmip/disable").status_code == 200
        assert admin.post("/keys/kmip/destroy").status_code == 200, "the KEK is destroyed with its data keys"
        for operation, *fields in (("Encrypt", ecb, t.byte_string("Data", block)), ("Decrypt", ecb, data), ("Get",)):
            assert c.one(operation, uid(kid), *fields).reason == "PermissionDenied", operation  # type: ignore[arg-type]
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-1", token=site.admin)
    refused = [r for r in records if r["action"] in ("kmip.encrypt", "kmip.decrypt", "kmip.get") and r.get("reason")]
    assert [(r["action"], r["reason"]) for r in refused] == [
        ("kmip.encrypt", "key_disabled"), ("kmip.decrypt", "key_disabled"), ("kmip.get", "key_disabled"),
        ("kmip.encrypt", "data_key_shredded"), ("kmip.decrypt", "data_key_shredded"), ("kmip.get", "data_key_shredded"),
    ]  # fmt: skip
