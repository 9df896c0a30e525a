"""The OASIS KMIP test cases (XML encoding) as TTLV: requests to send, expected responses to compare.

A case file is a ``<KMIP>`` element holding RequestMessage/ResponseMessage pairs. Element names are tag names,
``type`` the item type and ``value`` its value: enumerations by name (``AES``, ``SymmetricKey``; an
Attribute Value's enumeration by its Attribute Name), masks as words (``Encrypt Decrypt``), byte strings and
big integers in hex, date-times in ISO 8601 or ``$NOW``/``$NOW-3600``. ``$UNIQUE_IDENTIFIER_n`` is the n-th
identifier the server answered and ``$DATA_n`` data it produced, learned from the responses.

Comparing an expected response with the server's: every item must match in tag and type, structures as
multisets of their items, values equal, except what a server chooses (time stamps and other date-times,
generated key material and digests, RNG Retrieve's random Data, an Encrypt's IV the server drew and the
ciphertext under it, identifiers, which bind the placeholders) and Result Messages.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from keysteward.formats import kmip_enums as e
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_ttlv import Item, ItemType

_TYPES = {"Structure": ItemType.STRUCTURE, "Integer": ItemType.INTEGER, "LongInteger": ItemType.LONG_INTEGER,
          "BigInteger": ItemType.BIG_INTEGER, "Enumeration": ItemType.ENUMERATION, "Boolean": ItemType.BOOLEAN,
          "TextString": ItemType.TEXT_STRING, "ByteString": ItemType.BYTE_STRING, "DateTime": ItemType.DATE_TIME,
          "Interval": ItemType.INTERVAL, "DateTimeExtended": ItemType.DATE_TIME_EXTENDED}  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


TAGS = {_norm(name): number for name, number in t.TAGS.items()}
ENUMS_BY_TAG = {
    "ObjectType": e.OBJECT_TYPE, "Operation": e.OPERATION, "ResultStatus": e.RESULT_STATUS,
    "ResultReason": e.RESULT_REASON, "State": e.STATE, "CryptographicAlgorithm": e.CRYPTOGRAPHIC_ALGORITHM,
    "NameType": e.NAME_TYPE, "QueryFunction": e.QUERY_FUNCTION, "KeyFormatType": e.KEY_FORMAT_TYPE,
    "RevocationReasonCode": e.REVOCATION_REASON_CODE, "SecretDataType": e.SECRET_DATA_TYPE,
    "BatchErrorContinuationOption": e.BATCH_ERROR_CONTINUATION_OPTION, "LinkType": e.LINK_TYPE,
    "BlockCipherMode": e.BLOCK_CIPHER_MODE, "PaddingMethod": e.PADDING_METHOD,
    "HashingAlgorithm": e.HASHING_ALGORITHM, "InteropFunction": {"Begin": 1, "End": 2, "Reset": 3},
    "ValidityIndicator": {"Valid": 1, "Invalid": 2, "Unknown": 3}, "CertificateType": {"X509": 1, "Pgp": 2},
    "UsageLimitsUnit": {"Byte": 1, "Object": 2},
}  # fmt: skip
_ALIASES = {"des3": "TripleDes", "sha256": "Sha256"}
ENUMS_BY_ATTRIBUTE = {
    "Object Type": e.OBJECT_TYPE, "State": e.STATE, "Cryptographic Algorithm": e.CRYPTOGRAPHIC_ALGORITHM,
}  # fmt: skip
MASK = {_norm(name): value for name, value in e.CRYPTOGRAPHIC_USAGE_MASK.items()}
SERVER_CHOSEN = {"Random Number Generator"}
"""Attributes whose value is the server's own (which generator made the key): any value matches."""
IGNORED_VALUES = {t.TAGS[n] for n in ("TimeStamp", "KeyMaterial", "DigestValue", "ResultMessage")}


_REBOUND = {"IVCounterNonce": "$IV_COUNTER_NONCE", "AuthenticatedEncryptionTag": "$AUTHENTICATED_ENCRYPTION_TAG"}
"""Placeholders each Encrypt binds anew (the latest IV and tag the server drew)."""
_LEARNED = ("$UNIQUE_IDENTIFIER_", "$DATA_", *_REBOUND.values())
"""Placeholders a response binds (an identifier, data the server produced) and later requests use."""


class Unsupported(Exception):
    """A case the runner cannot express (a tag or enumeration name it does not know)."""


def _tag(name: str) -> int:
    if name.startswith("0x"):
        return int(name, 16)
    number = TAGS.get(_norm(name))
    if number is None:
        raise Unsupported(f"unknown tag {name}")
    return number


def _enum(table: dict[str, int] | None, value: str, what: str) -> int:
    if value.startswith("0x"):
        return int(value, 16)
    names = {_norm(k): v for k, v in (table or {}).items()}
    value = _ALIASES.get(_norm(value), value)
    if _norm(value) not in names:
        raise Unsupported(f"unknown {what} value {value}")
    return names[_norm(value)]


def _date(value: str) -> int:
    if value.startswith("$NOW"):
        return int(time.time()) + int(value[4:] or 0)
    return int(datetime.fromisoformat(value).timestamp())


def to_item(element: ET.Element, attribute_name: str = "") -> Item:
    tag = _tag(element.tag)
    kind = _TYPES[element.get("type", "Structure")]
    value = element.get("value", "")
    if kind is ItemType.STRUCTURE:
        children, name = [], ""
        for child in element:
            item = to_item(child, name)
            if item.tag == t.TAGS["AttributeName"]:
                name = str(item.value)
            children.append(item)
        return Item(tag, kind, tuple(children))
    if kind is ItemType.ENUMERATION:
        tag_name = t.TAG_NAMES.get(tag, "")
        if tag_name == "AttributeReference" and not value.startswith("0x"):
            return Item(tag, kind, _tag(value))  # KMIP 2: an attribute named by its tag
        table = ENUMS_BY_ATTRIBUTE.get(attribute_name) if tag_name == "AttributeValue" else ENUMS_BY_TAG.get(tag_name)
        return Item(tag, kind, _enum(table, value, tag_name or attribute_name))
    if kind in (ItemType.INTEGER, ItemType.LONG_INTEGER, ItemType.INTERVAL):
        if re.fullmatch(r"-?\d+|0x[0-9a-fA-F]+", value):
            return Item(tag, kind, int(value, 0))
        return Item(tag, kind, sum(_enum(MASK, word, "mask") for word in value.split()))
    if kind is ItemType.BOOLEAN:
        return Item(tag, kind, value == "true")
    if kind in (ItemType.BYTE_STRING, ItemType.BIG_INTEGER):
        try:
            return Item(tag, kind, bytes.fromhex(value.removeprefix("0x")))
        except ValueError:
            raise Unsupported(f"a placeholder byte string {value[:20]}") from None
    if kind in (ItemType.DATE_TIME, ItemType.DATE_TIME_EXTENDED):
        try:
            return Item(tag, kind, _date(value))
        except ValueError:
            raise Unsupported(f"a date-time {value[:20]}") from None
    return Item(tag, kind, value)


def load_case(path: Path) -> list[tuple[ET.Element, ET.Element]]:
    root = ET.fromstring(path.read_text())  # noqa: S314 - the repository's own test data
    messages = [m for m in root if m.tag in ("RequestMessage", "ResponseMessage")]
    return [(messages[i], messages[i + 1]) for i in range(0, len(messages) - 1, 2)]


@dataclass
class Bindings:
    ids: dict[str, str] = field(default_factory=dict)
    data_count: int = 0
    created: set[str] = field(default_factory=set)
    """Placeholders of keys the server made (Create): what they encrypt or decrypt is the server's to choose."""
    """Encrypt outputs under a server-drawn IV so far: the next is ``$DATA_<data_count>``."""

    def substitute(self, element: ET.Element) -> ET.Element:
        """The request with the identifiers learned so far in place of their placeholders."""
        for node in element.iter():
            value = node.get("value", "")
            if value.startswith(_LEARNED):
                if value not in self.ids:
                    raise Unsupported(f"{value} is used before the server named it")
                node.set("value", self.ids[value])
        return element


def expected_item(element: ET.Element, bindings: Bindings | None = None) -> tuple[Item, dict[tuple[int, ...], str]]:
    """The expected response, and where its identifier placeholders are (paths of child positions)."""
    holes: dict[tuple[int, ...], str] = {}

    for header in element.iter("ResponseHeader"):  # a server's own correlation value, optional
        for optional in header.findall("ServerCorrelationValue"):
            header.remove(optional)

    def walk(node: ET.Element, path: tuple[int, ...]) -> None:
        if node.get("generated"):
            holes[path] = "*"
            return
        if node.tag.replace(" ", "") in ("RandomNumberGenerator",):  # KMIP 2: the attribute by its tag
            holes[path] = "*"
            for child in list(node):
                node.remove(child)
            return
        name = node.find("AttributeName")
        if name is not None and name.get("value") in SERVER_CHOSEN:
            value = node.find("AttributeValue")
            if value is not None:
                holes[(*path, list(node).index(value))] = "*"
                for child in list(value):
                    value.remove(child)
                value.set("type", "Structure")
            return
        if node.get("value", "").startswith(_LEARNED):
            holes[path] = node.get("value", "")
            node.set("value", "")
        for n, child in enumerate(node):
            walk(child, (*path, n))

    for item in element.iter("BatchItem"):  # random bytes a server drew: any value of the same tag
        operation = item.find("Operation")
        named = item.find("ResponsePayload/UniqueIdentifier")
        if bindings is not None and operation is not None and named is not None:
            if operation.get("value") == "Create":
                bindings.created.add(named.get("value", ""))
            elif operation.get("value") in ("Encrypt", "Decrypt") and named.get("value") in bindings.created:
                for data in item.iter("Data"):  # under a key the server drew: its output is the server's too
                    data.set("generated", "1")
        if operation is not None and operation.get("value") == "RNGRetrieve":
            for data in item.iter("Data"):
                data.set("generated", "1")
        drawn = item.find("ResponsePayload/IVCounterNonce")
        if operation is not None and operation.get("value") == "Encrypt" and drawn is not None:
            for node in item.iter("Data"):  # under the IV the server drew: learned, as later requests use them
                if not node.get("value", "").startswith("$"):
                    node.set("value", f"$DATA_{bindings.data_count if bindings else 0}")
                if bindings is not None:
                    bindings.data_count += 1
            for name in ("IVCounterNonce", "AuthenticatedEncryptionTag"):
                for node in item.iter(name):
                    node.set("value", _REBOUND[name])
    walk(element, ())
    return to_item(element), holes


def matches(want: Item, got: Item, holes: dict[tuple[int, ...], str], path: tuple[int, ...],
            ids: dict[str, str]) -> dict[str, str] | None:  # fmt: skip
    """The identifier bindings under which ``got`` matches ``want``, or None."""
    if holes.get(path) == "*":
        return ids if want.tag == got.tag else None
    if want.tag != got.tag or want.type is not got.type:
        return None
    if want.type is ItemType.STRUCTURE:
        left = list(got.items)
        bound = dict(ids)
        for n, child in enumerate(want.items):
            for m, candidate in enumerate(left):
                trial = matches(child, candidate, holes, (*path, n), bound)
                if trial is not None:
                    bound = trial
                    del left[m]
                    break
            else:
                return None
        return bound if not left else None
    if path in holes:
        name = holes[path]
        value = got.value.hex() if isinstance(got.value, bytes) else str(got.value)
        if name in ids and ids[name] != value and name not in _REBOUND.values():
            return None
        return {**ids, name: value}
    if want.tag in IGNORED_VALUES or want.type in (ItemType.DATE_TIME, ItemType.DATE_TIME_EXTENDED):
        return ids
    return ids if want.value == got.value else None


def describe(item: Item, depth: int = 0) -> str:
    pad = "  " * depth
    if item.type is ItemType.STRUCTURE:
        return f"{pad}{item.name}\n" + "".join(describe(i, depth + 1) for i in item.items)
    return f"{pad}{item.name} {item.type.name} {item.value!r}\n"
