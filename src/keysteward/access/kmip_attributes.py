"""The attributes of a KMIP managed object: which a client may set, their types, and the object's state machine.

Attributes are held as ``name -> [AttributeValue item, ...]`` (TTLV items of :mod:`keysteward.formats.kmip_ttlv`,
named as KMIP 1.x names them: ``Cryptographic Length``, ``x-Component``). The server sets the ones in
:data:`SERVER_SET` (a client's Add, Modify or Delete of them is refused); a client sets the others at Create or
Register and with Add/Modify/DeleteAttribute, within :data:`CLIENT_SET` or as a custom attribute (``x-...``).
No key material is ever an attribute.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from keysteward.errors import BadRequest, Conflict, Denied
from keysteward.formats import kmip_ttlv as ttlv
from keysteward.formats.kmip_tags import TAGS
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.lru import Lru

MAX_ATTRIBUTE_BYTES: Final = 4096
"""One attribute value, encoded; more is refused (a hypervisor's tags are short)."""
MAX_ATTRIBUTE_VALUES: Final = 64
"""Values of one multi-valued attribute, and custom attributes of one object."""
_T = ItemType

SERVER_SET: Final[dict[str, ItemType]] = {
    "Unique Identifier": _T.TEXT_STRING,
    "Object Type": _T.ENUMERATION,
    "State": _T.ENUMERATION,
    "Initial Date": _T.DATE_TIME,
    "Last Change Date": _T.DATE_TIME,
    "Destroy Date": _T.DATE_TIME,
    "Compromise Date": _T.DATE_TIME,
    "Compromise Occurrence Date": _T.DATE_TIME,
    "Revocation Reason": _T.STRUCTURE,
    "Digest": _T.STRUCTURE,
    "Original Creation Date": _T.DATE_TIME,
    "Fresh": _T.BOOLEAN,
    "Random Number Generator": _T.STRUCTURE,
    "Lease Time": _T.INTERVAL,
    "Always Sensitive": _T.BOOLEAN,
    "Never Extractable": _T.BOOLEAN,
    "Short Unique Identifier": _T.BYTE_STRING,
    "Protection Storage Mask": _T.INTEGER,
    "Key Format Type": _T.ENUMERATION,
    "Certificate Length": _T.INTEGER,
    "Certificate Subject Cn": _T.TEXT_STRING,
}
CREATE_ONLY: Final[dict[str, ItemType]] = {
    "Certificate Type": _T.ENUMERATION,
    "Usage Limits": _T.STRUCTURE,
    "Cryptographic Algorithm": _T.ENUMERATION,
    "Cryptographic Length": _T.INTEGER,
    "Cryptographic Usage Mask": _T.INTEGER,
}
"""Set at Create or Register, read-only afterwards."""
CLIENT_SET: Final[dict[str, ItemType]] = {
    "Name": _T.STRUCTURE,
    "Object Group": _T.TEXT_STRING,
    "Contact Information": _T.TEXT_STRING,
    "Activation Date": _T.DATE_TIME,
    "Deactivation Date": _T.DATE_TIME,
    "Process Start Date": _T.DATE_TIME,
    "Protect Stop Date": _T.DATE_TIME,
    "Cryptographic Parameters": _T.STRUCTURE,
    "Link": _T.STRUCTURE,
    "Application Specific Information": _T.STRUCTURE,
    "Alternative Name": _T.STRUCTURE,
    "Description": _T.TEXT_STRING,
    "Comment": _T.TEXT_STRING,
    "Operation Policy Name": _T.TEXT_STRING,
    "Sensitive": _T.BOOLEAN,
    "Extractable": _T.BOOLEAN,
}
MULTI_VALUED: Final = frozenset(
    {"Name", "Object Group", "Link", "Application Specific Information", "Alternative Name"}
)
STATES: Final = ("PreActive", "Active", "Deactivated", "Compromised", "Destroyed", "DestroyedCompromised")
AUDITED_TAGS: Final = ("x-Name", "x-Identifier", "x-Component", "x-Product", "x-Vendor")
"""Custom attributes written into the audit record of every operation on the object (vSphere's tags)."""


def is_custom(name: str) -> bool:
    return name.startswith(("x-", "y-")) and 2 < len(name) <= 255


def expected_type(name: str) -> ItemType | None:
    """The type an attribute's value must have; None for a custom attribute (any type)."""
    for table in (SERVER_SET, CREATE_ONLY, CLIENT_SET):
        if name in table:
            return table[name]
    return None


def check_settable(name: str, value: Item, *, creating: bool) -> None:
    """Raise BadRequest (``kmip_invalid_field``/``kmip_read_only``) unless a client may set ``name`` to ``value``."""
    if name in SERVER_SET or (name in CREATE_ONLY and not creating):
        raise BadRequest(f"attribute '{name}' is set by the server", code="kmip_read_only")
    if not (is_custom(name) or name in CREATE_ONLY or name in CLIENT_SET):
        raise BadRequest(f"attribute '{name[:64]}' is not supported", code="kmip_unsupported_attribute")
    want = expected_type(name)
    if want is not None and value.type is not want:
        raise BadRequest(f"attribute '{name}' is a {want.name.lower()}", code="kmip_invalid_field")
    if name == "Usage Limits" and not _usage_limits_ok(value):
        raise BadRequest("Usage Limits holds a Usage Limits Total, a Unit (Byte, Object) and at most a Count",
                         code="kmip_invalid_field")  # fmt: skip
    if len(ttlv.encode(value)) > MAX_ATTRIBUTE_BYTES:
        raise BadRequest(
            f"attribute '{name[:64]}' is larger than {MAX_ATTRIBUTE_BYTES} bytes", code="kmip_invalid_field"
        )


def _usage_limits_ok(value: Item) -> bool:
    def number(tag: str, required: bool) -> bool:
        found = value.first(tag)
        if found is None:
            return not required
        return found.type is ItemType.LONG_INTEGER and isinstance(found.value, int) and found.value >= 0

    unit = value.first("UsageLimitsUnit")
    return (number("UsageLimitsTotal", True) and number("UsageLimitsCount", False) and unit is not None
            and unit.type is ItemType.ENUMERATION and unit.value in (1, 2))  # fmt: skip


def check_deletable(name: str) -> None:
    """Raise BadRequest unless a client may delete ``name`` (its own attributes; never the server's)."""
    if name in SERVER_SET or name in CREATE_ONLY:
        raise BadRequest(f"attribute '{name}' is set by the server", code="kmip_read_only")
    if not (is_custom(name) or name in CLIENT_SET):
        raise BadRequest(f"attribute '{name[:64]}' is not supported", code="kmip_unsupported_attribute")


@dataclass
class Attributes:
    """The client-visible attributes an object stores (the server-set ones are computed from its record)."""

    values: dict[str, list[Item]]

    @classmethod
    def from_json(cls, text: str) -> Attributes:
        raw = json.loads(text or "{}")
        return cls({name: [ttlv.decode_item(binascii.unhexlify(v)) for v in values] for name, values in raw.items()})

    @classmethod
    def copy_of(cls, text: str) -> Attributes:
        """The stored attributes ``text``, to change: a copy of the shared :func:`parsed` ones (items are
        immutable, so copying the lists is enough), decoded again only when this process has not yet."""
        return cls({name: list(values) for name, values in parsed(text).values.items()})

    def to_json(self) -> str:
        return json.dumps(
            {n: [ttlv.encode(v).hex() for v in vs] for n, vs in self.values.items() if vs}, sort_keys=True
        )

    def add(self, name: str, value: Item) -> int:
        """Add one value; its index. A second value of a single-valued attribute is refused."""
        values = self.values.setdefault(name, [])
        if values and not (name in MULTI_VALUED or is_custom(name)):
            raise Conflict(f"attribute '{name}' has a value already", code="kmip_single_valued")
        if name == "Name" and any(v.first("NameValue") == value.first("NameValue") for v in values):
            raise Conflict("the object has this Name already", code="kmip_name_not_unique")
        customs = sum(len(v) for n, v in self.values.items() if is_custom(n))
        if len(values) >= MAX_ATTRIBUTE_VALUES or (is_custom(name) and customs >= MAX_ATTRIBUTE_VALUES):
            raise Conflict("too many attribute values", code="kmip_too_many_attributes")
        values.append(value)
        return len(values) - 1

    def modify(self, name: str, index: int, value: Item) -> None:
        values = self.values.get(name, [])
        if not 0 <= index < len(values):
            raise Conflict(f"attribute '{name[:64]}' has no value at index {index}", code="kmip_attribute_not_found")
        values[index] = value

    def delete(self, name: str, index: int) -> Item:
        values = self.values.get(name, [])
        if not 0 <= index < len(values):
            raise Conflict(f"attribute '{name[:64]}' has no value at index {index}", code="kmip_attribute_not_found")
        return values.pop(index)

    def set(self, name: str, value: Item) -> None:
        self.values[name] = [value]

    def first(self, name: str) -> Item | None:
        values = self.values.get(name)
        return values[0] if values else None

    def name_value(self) -> str | None:
        """The first Name's value (what Locate by name matches first)."""
        name = self.first("Name")
        if name is None:
            return None
        item = name.first("NameValue")
        return item.value if item is not None and isinstance(item.value, str) else None

    def tags(self) -> dict[str, str]:
        """Custom attributes with a text value, as the policy's entity tags (the first value of each)."""
        out: dict[str, str] = {}
        for name, values in self.values.items():
            if is_custom(name) and values and values[0].type is ItemType.TEXT_STRING:
                out[name] = str(values[0].value)
        return out

    def audited(self) -> Mapping[str, str]:
        tags = self.tags()
        return {name: tags[name][:128] for name in AUDITED_TAGS if name in tags}


_PARSED: Lru[str, Attributes] = Lru(1024)


def parsed(text: str) -> Attributes:
    """The stored attributes ``text`` parsed, one instance shared by every reader: never change it (parse a
    copy with :meth:`Attributes.from_json` to change one)."""
    return _PARSED.get_or_make(text, lambda: Attributes.from_json(text))


def check_export(stored: str, *, wrapped: bool) -> None:
    """Raise Denied when a Get may not answer the material: never when Extractable is false, and not in the
    clear when Sensitive is true (KMIP). ``stored`` is the record's attributes text, decoded only when it names
    either (a Get's hot path decodes nothing more)."""
    if '"Extractable"' not in stored and '"Sensitive"' not in stored:
        return
    attributes = Attributes.from_json(stored)
    extractable, sensitive = attributes.first("Extractable"), attributes.first("Sensitive")
    if extractable is not None and extractable.value is False:
        raise Denied("the object is not extractable", code="kmip_not_extractable")
    if sensitive is not None and sensitive.value is True and not wrapped:
        raise Denied("a sensitive object leaves only wrapped", code="kmip_sensitive")


def initial_state(attributes: Attributes, now: datetime) -> str:
    """A new object's state: Active when its Activation Date is now or past (KMIP), else Pre-Active."""
    activation = attributes.first("Activation Date")
    if activation is not None and isinstance(activation.value, int) and activation.value <= now.timestamp():
        return "Active"
    return "PreActive"


def value_item(kind: ItemType, value: int | bool | str | bytes) -> Item:
    """An AttributeValue item."""
    return Item(TAGS["AttributeValue"], kind, value)
