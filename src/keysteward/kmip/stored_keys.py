"""Public keys, private keys and X.509 certificates a client registers (KMIP Baseline): stored, served back.

keysteward does not compute with them; it keeps them like any object (wrapped under the tenant's KEK, decided
by the policy, audited, destroyed by crypto-shredding). A key's material is the TTLV encoding of its Key
Material item as registered (a byte string in PKCS#1, PKCS#8 or X.509 format, or a Transparent RSA/DSA
structure), so Get answers it in the format it was registered in. A certificate's material is its DER value;
its Certificate Length and Certificate Subject CN are stated from it at Register (the client cannot set them).
"""

from __future__ import annotations

from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from keysteward.access.kmip_actions import KmipRecord
from keysteward.access.kmip_attributes import Attributes
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import KEY_FORMAT_TYPE
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip.errors import KmipError

KEY_TYPES: Final = ("PublicKey", "PrivateKey")
TYPES: Final = (*KEY_TYPES, "Certificate")
KEY_FORMATS: Final = {
    "PublicKey": tuple(KEY_FORMAT_TYPE[n] for n in ("Pkcs1", "X509", "TransparentRsaPublicKey",
                                                    "TransparentDsaPublicKey")),
    "PrivateKey": tuple(KEY_FORMAT_TYPE[n] for n in ("Pkcs1", "Pkcs8", "TransparentRsaPrivateKey",
                                                     "TransparentDsaPrivateKey")),
}  # fmt: skip
X509: Final = 1
"""Certificate Type X.509 (the only one stored; PGP is not)."""
FORMAT: Final = "_Key Format Type"
CERTIFICATE_TYPE: Final = "_Certificate Type"
MAX_MATERIAL: Final = 8192


def material(payload: Item, name: str) -> tuple[bytes, list[tuple[str, Item]]]:
    """The bytes to store for a registered key or certificate, and what the server states about it."""
    holder = payload.first(name)
    if holder is None or holder.type is not ItemType.STRUCTURE:
        raise KmipError("MissingData", f"Register of a {name} needs the object")
    if name == "Certificate":
        kind, value = holder.first("CertificateType"), holder.first("CertificateValue")
        if kind is None or kind.type is not ItemType.ENUMERATION or kind.value != X509:
            raise KmipError("InvalidField", "certificates are registered as X.509")
        if value is None or value.type is not ItemType.BYTE_STRING or not isinstance(value.value, bytes):
            raise KmipError("InvalidField", "the Certificate Value is a byte string")
        if not 1 <= len(value.value) <= MAX_MATERIAL:
            raise KmipError("InvalidField", f"the certificate is 1 to {MAX_MATERIAL} bytes")
        return value.value, _certificate_facts(value.value)
    block = holder.first("KeyBlock")
    fmt = block.first("KeyFormatType") if block is not None and block.type is ItemType.STRUCTURE else None
    if block is None or fmt is None or fmt.type is not ItemType.ENUMERATION:
        raise KmipError("MissingData", f"the {name} needs a Key Block with its Key Format Type")
    if fmt.value not in KEY_FORMATS[name]:
        raise KmipError("KeyFormatTypeNotSupported", f"this {name} format is not stored")
    key_value = block.first("KeyValue")
    key = key_value.first("KeyMaterial") if key_value is not None and key_value.type is ItemType.STRUCTURE else None
    transparent = fmt.value not in (KEY_FORMAT_TYPE["Pkcs1"], KEY_FORMAT_TYPE["Pkcs8"], KEY_FORMAT_TYPE["X509"])
    if key is None or key.type is not (ItemType.STRUCTURE if transparent else ItemType.BYTE_STRING):
        raise KmipError("InvalidField", "the Key Material does not fit the Key Format Type")
    encoded = t.encode(key)
    if len(encoded) > MAX_MATERIAL:
        raise KmipError("InvalidField", f"the key is at most {MAX_MATERIAL} bytes")
    stated: list[tuple[str, Item]] = [(FORMAT, Item(t.TAGS["AttributeValue"], ItemType.ENUMERATION, fmt.value))]
    for tag, attribute in (("CryptographicAlgorithm", "Cryptographic Algorithm"),
                           ("CryptographicLength", "Cryptographic Length")):  # fmt: skip
        found = block.first(tag)
        if found is not None:
            stated.append((attribute, Item(t.TAGS["AttributeValue"], found.type, found.value)))
    return encoded, stated


def _certificate_facts(der: bytes) -> list[tuple[str, Item]]:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise KmipError("InvalidField", "the Certificate Value is not an X.509 certificate") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    out = [
        (CERTIFICATE_TYPE, Item(t.TAGS["AttributeValue"], ItemType.ENUMERATION, X509)),
        ("Certificate Length", Item(t.TAGS["AttributeValue"], ItemType.INTEGER, len(der))),
    ]
    if names:
        out.append(
            ("Certificate Subject Cn", Item(t.TAGS["AttributeValue"], ItemType.TEXT_STRING, str(names[0].value)))
        )
    return out


def object_item(record: KmipRecord, material: bytes) -> Item:
    stored = Attributes.from_json(record.attributes)
    if record.object_type == "Certificate":
        return t.struct_(
            "Certificate", t.enumeration("CertificateType", X509), t.byte_string("CertificateValue", material)
        )
    fmt, algorithm, length = (stored.first(n) for n in (FORMAT, "Cryptographic Algorithm", "Cryptographic Length"))
    key = t.decode_item(material)
    block = t.struct_(
        "KeyBlock",
        t.enumeration("KeyFormatType", int(fmt.value) if fmt is not None else KEY_FORMAT_TYPE["Pkcs1"]),  # type: ignore[arg-type]
        t.struct_("KeyValue", Item(t.TAGS["KeyMaterial"], key.type, key.value)),
        t.enumeration("CryptographicAlgorithm", int(algorithm.value)) if algorithm is not None else None,  # type: ignore[arg-type]
        t.integer("CryptographicLength", int(length.value)) if length is not None else None,  # type: ignore[arg-type]
    )
    return t.struct_(record.object_type, block)
