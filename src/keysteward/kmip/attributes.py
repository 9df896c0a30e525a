"""KMIP 1.x attributes on the wire: ``Attribute{Attribute Name, Attribute Index?, Attribute Value}`` and templates.

What a client may set, and the types, are :mod:`keysteward.access.kmip_attributes`' rules; here are only the
request parsing and the response items, including the attributes the server computes from an object's record.
"""

from __future__ import annotations

import hashlib

from keysteward.access.kmip_actions import KmipRecord
from keysteward.access.kmip_attributes import Attributes, check_deletable, check_settable, parsed, value_item
from keysteward.errors import KeystewardError
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import KEY_FORMAT_TYPE, OBJECT_TYPE, STATE
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip.errors import KmipError

MAX_TEMPLATE = 64


def _text(item: Item | None, what: str) -> str:
    if item is None or item.type is not ItemType.TEXT_STRING or not isinstance(item.value, str):
        raise KmipError("InvalidField", f"{what} is missing or not a text string")
    return item.value


def parse_attribute(item: Item) -> tuple[str, int | None, Item | None]:
    """An ``Attribute`` structure: its name, index (None when absent) and value (None when absent)."""
    if item.type is not ItemType.STRUCTURE:
        raise KmipError("InvalidField", "an attribute is a structure")
    name = _text(item.first("AttributeName"), "Attribute Name")
    index_item = item.first("AttributeIndex")
    index = None
    if index_item is not None:
        if index_item.type is not ItemType.INTEGER or not isinstance(index_item.value, int) or index_item.value < 0:
            raise KmipError("InvalidField", "Attribute Index is a non-negative integer")
        index = index_item.value
    return name, index, item.first("AttributeValue")


def is_fresh_claim(name: str, value: Item | None) -> bool:
    """A Create/Register that says Fresh = true: what the server states anyway (true until the first Get), so
    it is taken and not stored; Fresh = false is refused like any server attribute."""
    return name == "Fresh" and value is not None and value.type is ItemType.BOOLEAN and value.value is True


def settable(name: str, value: Item | None, *, creating: bool) -> tuple[str, Item]:
    if value is None:
        raise KmipError("InvalidField", f"attribute '{name[:64]}' has no value")
    try:
        check_settable(name, value, creating=creating)
    except KeystewardError as exc:
        reason = "PermissionDenied" if exc.code == "kmip_read_only" else "InvalidField"
        raise KmipError(reason, exc.message, exc.code or "") from None
    return name, value


def deletable(name: str) -> None:
    try:
        check_deletable(name)
    except KeystewardError as exc:
        reason = "PermissionDenied" if exc.code == "kmip_read_only" else "InvalidField"
        raise KmipError(reason, exc.message, exc.code or "") from None


def template(payload: Item) -> list[tuple[str, Item]]:
    """A Create/Register payload's attributes (its Template-Attribute's, in order)."""
    out: list[tuple[str, Item]] = []
    for holder in payload.all("TemplateAttribute"):
        for item in holder.items:
            if item.tag == t.TAGS["Name"]:  # a Template-Attribute may carry Names directly (KMIP 1.0)
                out.append(("Name", Item(t.TAGS["AttributeValue"], item.type, item.value)))
            elif item.tag == t.TAGS["Attribute"]:
                name, _, value = parse_attribute(item)
                if not is_fresh_claim(name, value):
                    out.append(settable(name, value, creating=True))
            else:
                raise KmipError("InvalidField", f"{item.name} is not in a template-attribute")
    if len(out) > MAX_TEMPLATE:
        raise KmipError("InvalidField", f"more than {MAX_TEMPLATE} attributes")
    return out


def attribute(name: str, index: int, value: Item) -> Item:
    return t.struct_(
        "Attribute",
        t.text("AttributeName", name),
        t.integer("AttributeIndex", index) if index else None,
        Item(t.TAGS["AttributeValue"], value.type, value.value),
    )


LEASE_TIME = 3600
"""Seconds, advisory: the Lease Time attribute a client reads (KMIP's Obtain Lease is not served)."""
SINCE: dict[str, tuple[int, int]] = {
    "Fresh": (1, 1), "Original Creation Date": (1, 3), "Random Number Generator": (1, 3),
    "Sensitive": (1, 4), "Always Sensitive": (1, 4), "Extractable": (1, 4), "Never Extractable": (1, 4),
    "Short Unique Identifier": (2, 0), "Protection Storage Mask": (2, 0), "Key Format Type": (2, 0),
}  # fmt: skip
PROTECTION_SOFTWARE = 1
"""Protection Storage Mask Software: the material is wrapped under a KEK held by keysteward, not in an HSM."""
"""The first protocol version that defines an attribute (a response never names one its version lacks)."""


def _server_defaults(record: KmipRecord, stored: Attributes, version: tuple[int, int]) -> list[tuple[str, Item]]:
    """Attributes the server states for every object, in the versions that define them."""
    out: list[tuple[str, Item]] = [("Lease Time", value_item(ItemType.INTERVAL, LEASE_TIME))]
    if version >= (1, 1):
        out.append(("Fresh", value_item(ItemType.BOOLEAN, record.last_get_at is None)))
    initial = stored.first("Initial Date")
    if version >= (1, 3) and initial is not None:
        out.append(("Original Creation Date", initial))
    if version >= (2, 0):
        short = hashlib.sha256(record.uid.encode()).digest()
        out += [
            ("Short Unique Identifier", value_item(ItemType.BYTE_STRING, short)),
            ("Protection Storage Mask", value_item(ItemType.INTEGER, PROTECTION_SOFTWARE)),
        ]
        if record.object_type in ("SymmetricKey", "SecretData"):
            out.append(("Key Format Type", value_item(ItemType.ENUMERATION, KEY_FORMAT_TYPE["Raw"])))
    if version >= (1, 4):
        sensitive = stored.first("Sensitive")
        extractable = stored.first("Extractable")
        out += [
            ("Always Sensitive", value_item(ItemType.BOOLEAN, bool(sensitive is not None and sensitive.value))),
            (
                "Never Extractable",
                value_item(ItemType.BOOLEAN, bool(extractable is not None and not extractable.value)),
            ),
        ]
        if sensitive is None:
            out.append(("Sensitive", value_item(ItemType.BOOLEAN, False)))
        if extractable is None:
            out.append(("Extractable", value_item(ItemType.BOOLEAN, True)))
    return out


def all_attributes(record: KmipRecord, version: tuple[int, int] = (1, 4)) -> list[tuple[str, list[Item]]]:
    """Every attribute of the object in ``version``: the server's first, then the stored ones."""
    stored = parsed(record.attributes)  # shared: only read here
    out: list[tuple[str, list[Item]]] = [
        ("Unique Identifier", [value_item(ItemType.TEXT_STRING, record.uid)]),
        ("Object Type", [value_item(ItemType.ENUMERATION, OBJECT_TYPE[record.object_type])]),
        ("State", [value_item(ItemType.ENUMERATION, STATE[record.state])]),
    ]
    out.extend((name, [value]) for name, value in _server_defaults(record, stored, version))
    out.extend((name, values) for name, values in stored.values.items() if values and not name.startswith("_"))
    return [(name, values) for name, values in out if SINCE.get(name, (1, 0)) <= version]


def names(record: KmipRecord, version: tuple[int, int] = (1, 4)) -> list[str]:
    return [name for name, _ in all_attributes(record, version)]
