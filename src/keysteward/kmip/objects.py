"""Managed objects on the wire: the material of a Register, and the object a Get answers (Raw format).

The material crosses this module as the client sent it or as the access path delivered it, never logged.
"""

from __future__ import annotations

from typing import Final

from keysteward.access.kmip_actions import KmipRecord
from keysteward.access.kmip_attributes import parsed
from keysteward.crypto.secret import SecretBuffer
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import KEY_FORMAT_TYPE
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip import attributes as attrs
from keysteward.kmip import stored_keys
from keysteward.kmip.errors import KmipError

SERVED_FORMATS: Final = (KEY_FORMAT_TYPE["Raw"], KEY_FORMAT_TYPE["Opaque"], KEY_FORMAT_TYPE["TransparentSymmetricKey"])
FORMAT: Final = "_Key Format Type"
OPAQUE_TYPE: Final = "_Opaque Data Type"
"""Hidden attributes (a leading ``_``: no client can name them, no response shows them): the format a key was
registered in, served back by default, and an opaque object's Opaque Data Type."""


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
        if fmt is not None and fmt.value not in SERVED_FORMATS:
            raise KmipError("KeyFormatTypeNotSupported", "keys are registered in the Raw or Transparent format")
        if fmt is not None and fmt.value == KEY_FORMAT_TYPE["TransparentSymmetricKey"]:
            value = value.first("Key") if value is not None and value.type is ItemType.STRUCTURE else None
    if value is None or value.type is not ItemType.BYTE_STRING or not isinstance(value.value, bytes):
        raise KmipError("InvalidField", "the object's material is missing or not a byte string")
    if not 1 <= len(value.value) <= 8192:
        raise KmipError("InvalidField", "the object's material is 1 to 8192 bytes")
    return value.value


def form_attributes(payload: Item, name: str, template: list[tuple[str, Item]], size: int) -> list[tuple[str, Item]]:
    """The template plus what the registered form says: a key's algorithm, length and format, an opaque
    object's Opaque Data Type."""
    holder = payload.first(name)
    assert holder is not None
    if name == "OpaqueObject":
        kind = holder.first("OpaqueDataType")
        if kind is None or kind.type is not ItemType.ENUMERATION:
            return template
        return [*template, (OPAQUE_TYPE, Item(t.TAGS["AttributeValue"], ItemType.ENUMERATION, kind.value))]
    block = holder.first("KeyBlock")
    fmt = block.first("KeyFormatType") if block is not None else None
    if fmt is not None and fmt.type is ItemType.ENUMERATION:
        template = [*template, (FORMAT, Item(t.TAGS["AttributeValue"], ItemType.ENUMERATION, fmt.value))]
    return key_block_attributes(payload, template, size) if name == "SymmetricKey" else template


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


def object_item(record: KmipRecord, secret: SecretBuffer, fmt: int | None = None) -> Item:
    """The object a Get answers, in the format asked (else the one it was registered in, else Raw)."""
    material = bytes(secret.view())
    if record.object_type in stored_keys.TYPES:
        return stored_keys.object_item(record, material)
    stored = parsed(record.attributes)  # shared: only read here
    if record.object_type == "OpaqueObject":
        kind = stored.first(OPAQUE_TYPE)
        return t.struct_("OpaqueObject", t.enumeration("OpaqueDataType", int(kind.value) if kind else 0x80000000),  # type: ignore[arg-type]
                         t.byte_string("OpaqueDataValue", material))  # fmt: skip
    algorithm, length = stored.first("Cryptographic Algorithm"), stored.first("Cryptographic Length")
    registered = stored.first(FORMAT)
    default = KEY_FORMAT_TYPE["Raw"] if record.object_type == "SymmetricKey" else KEY_FORMAT_TYPE["Opaque"]
    fmt = fmt or (int(registered.value) if registered is not None else None) or default  # type: ignore[arg-type]
    if record.object_type != "SymmetricKey" and fmt not in (KEY_FORMAT_TYPE["Raw"], KEY_FORMAT_TYPE["Opaque"]):
        fmt = default
    transparent = fmt == KEY_FORMAT_TYPE["TransparentSymmetricKey"]
    block = t.struct_(
        "KeyBlock",
        t.enumeration("KeyFormatType", fmt),
        t.struct_(
            "KeyValue",
            t.struct_("KeyMaterial", t.byte_string("Key", material))
            if transparent
            else t.byte_string("KeyMaterial", material),
        ),
        t.enumeration("CryptographicAlgorithm", int(algorithm.value)) if algorithm is not None else None,  # type: ignore[arg-type]
        t.integer("CryptographicLength", int(length.value)) if length is not None else None,  # type: ignore[arg-type]
    )
    if record.object_type == "SecretData":
        return t.struct_("SecretData", t.enumeration("SecretDataType", 1), block)
    return t.struct_("SymmetricKey", block)
