"""KMIP 2.x attributes on the wire: items named by their own tag inside ``Attributes``, ``Attribute Reference``
enumerations naming a tag, ``New Attribute`` / ``Current Attribute`` holding one attribute.

keysteward keeps attributes under their KMIP 1.x names (``Cryptographic Length``) as ``Attribute Value`` items;
this module converts both ways: the 2.x tag ``CryptographicLength`` is that name without its spaces, and a
2.x vendor attribute of vendor ``x`` named ``n`` is the custom attribute ``x-n``.
"""

from __future__ import annotations

import re
from typing import Final

from keysteward.access.kmip_attributes import is_custom
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip import attributes as attrs
from keysteward.kmip.errors import KmipError

_SPLIT = re.compile(r"(?<=[a-z])(?=[A-Z])")
ATTRIBUTE_VALUE: Final = t.TAGS["AttributeValue"]


def name_of(tag: int) -> str:
    """The 1.x attribute name of a 2.x attribute tag: ``CryptographicLength`` -> ``Cryptographic Length``."""
    name = t.TAG_NAMES.get(tag)
    if name is None:
        raise KmipError("InvalidField", f"tag 0x{tag:06X} names no attribute")
    return _SPLIT.sub(" ", name)


def tag_of(name: str) -> int | None:
    return t.TAGS.get(name.replace(" ", ""))


def to_value(item: Item) -> tuple[str, Item]:
    """A 2.x attribute item as (1.x name, Attribute Value item); a vendor attribute
    ``Attribute{Vendor Identification x, Attribute Name n, Attribute Value}`` is the custom attribute ``x-n``."""
    if item.tag == t.TAGS["Attribute"]:
        vendor, name, value = (
            item.first("VendorIdentification"),
            item.first("AttributeName"),
            item.first("AttributeValue"),
        )
        if (
            vendor is None
            or name is None
            or value is None
            or not isinstance(vendor.value, str)
            or not isinstance(name.value, str)
        ):
            raise KmipError("InvalidField", "a vendor attribute names its vendor, name and value")
        return f"{vendor.value}-{name.value}", value
    return name_of(item.tag), Item(ATTRIBUTE_VALUE, item.type, item.value)


def to_item(name: str, value: Item) -> Item | None:
    """A stored attribute as its 2.x item (a custom ``x-n`` as the vendor attribute of vendor ``x``)."""
    if is_custom(name):
        vendor, _, rest = name.partition("-")
        return t.struct_("Attribute", t.text("VendorIdentification", vendor), t.text("AttributeName", rest),
                         Item(ATTRIBUTE_VALUE, value.type, value.value))  # fmt: skip
    tag = tag_of(name)
    return None if tag is None else Item(tag, value.type, value.value)


def template(payload: Item) -> list[tuple[str, Item]]:
    """A Create/Register payload's ``Attributes`` (and ``Common Attributes``), as settable (name, value) pairs."""
    out: list[tuple[str, Item]] = []
    for holder in (*payload.all("Attributes"), *payload.all("CommonAttributes")):
        if holder.type is not ItemType.STRUCTURE:
            raise KmipError("InvalidField", "Attributes is a structure")
        for item in holder.items:
            name, value = to_value(item)
            if not attrs.is_fresh_claim(name, value):
                out.append(attrs.settable(name, value, creating=True))
    if len(out) > attrs.MAX_TEMPLATE:
        raise KmipError("InvalidField", f"more than {attrs.MAX_TEMPLATE} attributes")
    return out


def references(payload: Item) -> list[str]:
    """The attribute names a GetAttributes asks for: ``Attribute Reference`` enumerations of tags, or
    ``Attribute Reference{Vendor Identification, Attribute Name}`` for a vendor attribute."""
    out = []
    for ref in payload.all("AttributeReference"):
        if ref.type is ItemType.STRUCTURE:
            vendor, name = ref.first("VendorIdentification"), ref.first("AttributeName")
            if vendor is None or name is None or not isinstance(vendor.value, str) or not isinstance(name.value, str):
                raise KmipError("InvalidField", "a vendor attribute reference names its vendor and name")
            out.append(f"{vendor.value}-{name.value}")
        elif ref.type is ItemType.ENUMERATION and isinstance(ref.value, int):
            out.append(name_of(ref.value))
        else:
            raise KmipError("InvalidField", "an Attribute Reference names a tag or a vendor attribute")
    return out


def one_attribute(holder: Item | None, what: str) -> tuple[str, Item]:
    """The attribute inside a ``New Attribute`` or ``Current Attribute``."""
    if holder is None or holder.type is not ItemType.STRUCTURE or len(holder.items) != 1:
        raise KmipError("InvalidField", f"{what} holds one attribute")
    return to_value(holder.items[0])


def attributes(pairs: list[tuple[str, list[Item]]], wanted: list[str]) -> Item:
    items = []
    for name, values in pairs:
        if wanted and name not in wanted:
            continue
        for value in values:
            item = to_item(name, value)
            if item is not None:
                items.append(item)
    return t.struct_("Attributes", *items)


def attribute_references(names: list[str]) -> list[Item]:
    out = []
    for name in names:
        if is_custom(name):
            vendor, _, rest = name.partition("-")
            out.append(t.struct_("AttributeReference", t.text("VendorIdentification", vendor),
                                 t.text("AttributeName", rest)))  # fmt: skip
        elif (tag := tag_of(name)) is not None:
            out.append(t.enumeration("AttributeReference", tag))
    return out
