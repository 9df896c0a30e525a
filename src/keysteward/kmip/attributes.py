"""KMIP 1.x attributes on the wire: ``Attribute{Attribute Name, Attribute Index?, Attribute Value}`` and templates.

What a client may set, and the types, are :mod:`keysteward.access.kmip_attributes`' rules; here are only the
request parsing and the response items, including the attributes the server computes from an object's record.
"""

from __future__ import annotations

from keysteward.access.kmip_actions import KmipRecord
from keysteward.access.kmip_attributes import Attributes, check_deletable, check_settable, value_item
from keysteward.errors import KeystewardError
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import OBJECT_TYPE, STATE
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


def all_attributes(record: KmipRecord) -> list[tuple[str, list[Item]]]:
    """Every attribute of the object, the server's first, in a stable order."""
    stored = Attributes.from_json(record.attributes)
    out: list[tuple[str, list[Item]]] = [
        ("Unique Identifier", [value_item(ItemType.TEXT_STRING, record.uid)]),
        ("Object Type", [value_item(ItemType.ENUMERATION, OBJECT_TYPE[record.object_type])]),
        ("State", [value_item(ItemType.ENUMERATION, STATE[record.state])]),
    ]
    out.extend((name, values) for name, values in stored.values.items() if values)
    return out


def names(record: KmipRecord) -> list[str]:
    return [name for name, _ in all_attributes(record)]
