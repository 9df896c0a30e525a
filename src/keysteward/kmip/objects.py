"""Managed objects on the wire: the material of a Register, and the object a Get answers (Raw format).

The material crosses this module as the client sent it or as the access path delivered it, never logged.
"""

from __future__ import annotations

from keysteward.access.kmip_actions import KmipRecord
from keysteward.access.kmip_attributes import parsed
from keysteward.crypto.secret import SecretBuffer
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import KEY_FORMAT_TYPE
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip import attributes as attrs
from keysteward.kmip.errors import KmipError


def material(payload: Item, name: str) -> bytes:
    holder = payload.first(name)
    if holder is None or holder.type is not ItemType.STRUCTURE:
        raise KmipError("MissingData", f"Register of a {name} needs the object")
    if name == "OpaqueObject":
        value = holder.first("OpaqueDataValue")
    else:
        block = holder.first("KeyBlock")
        key_value = block.first("KeyValue") if block is not None else None
        value = (
            key_value.first("KeyMaterial") if key_value is not None and key_value.type is ItemType.STRUCTURE else None
        )
        fmt = block.first("KeyFormatType") if block is not None else None
        if fmt is not None and fmt.value not in (KEY_FORMAT_TYPE["Raw"], KEY_FORMAT_TYPE["Opaque"]):
            raise KmipError("KeyFormatTypeNotSupported", "keys are registered in the Raw format")
    if value is None or value.type is not ItemType.BYTE_STRING or not isinstance(value.value, bytes):
        raise KmipError("InvalidField", "the object's material is missing or not a byte string")
    if not 1 <= len(value.value) <= 8192:
        raise KmipError("InvalidField", "the object's material is 1 to 8192 bytes")
    return value.value


def key_block_attributes(payload: Item, template: list[tuple[str, Item]], size: int) -> list[tuple[str, Item]]:
    """A registered key's algorithm and length from its key block, unless the template names them."""
    block = payload.first("SymmetricKey").first("KeyBlock")  # type: ignore[union-attr]
    assert block is not None
    names = {name for name, _ in template}
    algorithm = block.first("CryptographicAlgorithm")
    out = list(template)
    if "Cryptographic Algorithm" not in names and algorithm is not None:
        out.append(attrs.settable("Cryptographic Algorithm", Item(t.TAGS["AttributeValue"], algorithm.type,
                                                                  algorithm.value), creating=True))  # fmt: skip
    if "Cryptographic Length" not in names:
        out.append(("Cryptographic Length", Item(t.TAGS["AttributeValue"], ItemType.INTEGER, size * 8)))
    return out


def object_item(record: KmipRecord, secret: SecretBuffer) -> Item:
    material = bytes(secret.view())
    if record.object_type == "OpaqueObject":
        return t.struct_("OpaqueObject", t.enumeration("OpaqueDataType", 0x80000000),
                         t.byte_string("OpaqueDataValue", material))  # fmt: skip
    stored = parsed(record.attributes)  # shared: only read here
    algorithm, length = stored.first("Cryptographic Algorithm"), stored.first("Cryptographic Length")
    block = t.struct_(
        "KeyBlock",
        t.enumeration("KeyFormatType", KEY_FORMAT_TYPE["Raw"] if record.object_type == "SymmetricKey" else 2),
        t.struct_("KeyValue", t.byte_string("KeyMaterial", material)),
        t.enumeration("CryptographicAlgorithm", int(algorithm.value)) if algorithm is not None else None,  # type: ignore[arg-type]
        t.integer("CryptographicLength", int(length.value)) if length is not None else None,  # type: ignore[arg-type]
    )
    if record.object_type == "SecretData":
        return t.struct_("SecretData", t.enumeration("SecretDataType", 1), block)
    return t.struct_("SymmetricKey", block)
