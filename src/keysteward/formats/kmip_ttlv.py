"""KMIP's TTLV encoding (tag, type, length, value), pure and bounded.

Every item is 3 bytes of tag, 1 of type, 4 of length (big-endian), then the value padded with zero bytes to a
multiple of 8. A structure's value is its items. This module decodes a message into a tree of :class:`Item`
and encodes one back, byte for byte: nothing is normalised, so ``encode(decode(data)) == data`` for every
message it accepts. It knows no operation; :mod:`keysteward.formats.kmip_tags` names the tags.

Bounds on hostile input (:class:`Bounds`): the whole message size (checked from the first 8 bytes by
:func:`frame_length`, before a listener reads the rest), the nesting depth and the number of items, so a
message costs at most a bounded amount of memory and time. Every refusal is a :class:`TtlvError` with a
short ``code`` (``truncated``, ``bad_length``, ``bad_type``, ``bad_padding``, ``bad_value``, ``bad_tag``,
``too_deep``, ``too_many_items``, ``too_large``, ``trailing_bytes``) and never echoes the input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple

from keysteward.formats.kmip_tags import TAG_NAMES as TAG_NAMES
from keysteward.formats.kmip_tags import TAGS as TAGS

HEADER: Final = 8
_HEAD = struct.Struct(">I I")  # tag<<8|type, length
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")


class ItemType(IntEnum):
    STRUCTURE = 0x01
    INTEGER = 0x02
    LONG_INTEGER = 0x03
    BIG_INTEGER = 0x04
    ENUMERATION = 0x05
    BOOLEAN = 0x06
    TEXT_STRING = 0x07
    BYTE_STRING = 0x08
    DATE_TIME = 0x09
    INTERVAL = 0x0A
    DATE_TIME_EXTENDED = 0x0B


_FIXED: Final[dict[ItemType, int]] = {
    ItemType.INTEGER: 4,
    ItemType.LONG_INTEGER: 8,
    ItemType.ENUMERATION: 4,
    ItemType.BOOLEAN: 8,
    ItemType.DATE_TIME: 8,
    ItemType.INTERVAL: 4,
    ItemType.DATE_TIME_EXTENDED: 8,
}
_TYPES: Final = {t.value: t for t in ItemType}


class TtlvError(ValueError):
    """A message that is not valid TTLV within the bounds; ``code`` says which rule it broke."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Bounds:
    max_bytes: int = 1 << 20
    """The whole message, header included."""
    max_depth: int = 16
    """Structures inside structures; the message itself is depth 1."""
    max_items: int = 8192
    """Items in the whole message, structures included."""


DEFAULT_BOUNDS: Final = Bounds()
Value = tuple["Item", ...] | int | bool | str | bytes


class Item(NamedTuple):
    """One TTLV item. ``value`` by type: structure a tuple of items; integer, long, enumeration, interval and
    the date-times an int (seconds, or microseconds for the extended one); boolean a bool; text a str; byte
    string and big integer the bytes as sent (a big integer's two's complement, a multiple of 8 long).

    Immutable as a tuple is (a frozen dataclass was made three times slower, and a KMIP operation makes dozens
    of items)."""

    tag: int
    type: ItemType
    value: Value

    @property
    def name(self) -> str:
        return TAG_NAMES.get(self.tag, f"0x{self.tag:06X}")

    @property
    def items(self) -> tuple[Item, ...]:
        if self.type is not ItemType.STRUCTURE:
            raise TtlvError("bad_type", f"{self.name} is not a structure")
        assert isinstance(self.value, tuple)
        return self.value

    def all(self, name: str) -> list[Item]:
        """The direct children tagged ``name``."""
        tag = TAGS[name]
        return [item for item in self.items if item.tag == tag]

    def first(self, name: str) -> Item | None:
        tag = TAGS[name]
        for item in self.items:
            if item.tag == tag:
                return item
        return None

    def walk(self) -> Iterator[Item]:
        """This item and every item inside it, depth first, in order (one generator, not one per level)."""
        stack = [self]
        while stack:
            item = stack.pop()
            yield item
            if item.type is ItemType.STRUCTURE:
                stack.extend(reversed(item.items))


def tag_of(tag: str | int) -> int:
    if isinstance(tag, int):
        return tag
    try:
        return TAGS[tag]
    except KeyError:
        raise TtlvError("bad_tag", f"no KMIP tag named {tag[:64]!r}") from None


# -- building items -----------------------------------------------------------------------------------------
def struct_(tag: str | int, *items: Item | None) -> Item:
    return Item(tag_of(tag), ItemType.STRUCTURE, tuple(i for i in items if i is not None))


def integer(tag: str | int, value: int) -> Item:
    return Item(tag_of(tag), ItemType.INTEGER, value)


def long_integer(tag: str | int, value: int) -> Item:
    return Item(tag_of(tag), ItemType.LONG_INTEGER, value)


def enumeration(tag: str | int, value: int) -> Item:
    return Item(tag_of(tag), ItemType.ENUMERATION, value)


def boolean(tag: str | int, value: bool) -> Item:
    return Item(tag_of(tag), ItemType.BOOLEAN, value)


def text(tag: str | int, value: str) -> Item:
    return Item(tag_of(tag), ItemType.TEXT_STRING, value)


def byte_string(tag: str | int, value: bytes) -> Item:
    return Item(tag_of(tag), ItemType.BYTE_STRING, bytes(value))


def date_time(tag: str | int, seconds: int) -> Item:
    return Item(tag_of(tag), ItemType.DATE_TIME, seconds)


def interval(tag: str | int, seconds: int) -> Item:
    return Item(tag_of(tag), ItemType.INTERVAL, seconds)


def big_integer(tag: str | int, value: int) -> Item:
    """A big integer in the shortest two's complement that is a multiple of 8 bytes."""
    size = 8
    while not -(1 << (size * 8 - 1)) <= value < (1 << (size * 8 - 1)):
        size += 8
    return Item(tag_of(tag), ItemType.BIG_INTEGER, value.to_bytes(size, "big", signed=True))


def big_integer_value(item: Item) -> int:
    assert isinstance(item.value, bytes)
    return int.from_bytes(item.value, "big", signed=True)


# -- framing --------------------------------------------------------------------------------------------
def frame_length(header: bytes, bounds: Bounds = DEFAULT_BOUNDS) -> int:
    """From a message's first 8 bytes, its whole length; refuses a non-structure or one over the bound."""
    if len(header) < HEADER:
        raise TtlvError("truncated", "a TTLV message starts with 8 bytes of header")
    word: int
    length: int
    word, length = _HEAD.unpack_from(header)
    _check_tag(word >> 8)
    if word & 0xFF != ItemType.STRUCTURE:
        raise TtlvError("bad_type", "a KMIP message is a structure")
    if length % 8:
        raise TtlvError("bad_length", "a structure's length is a multiple of 8")
    if HEADER + length > bounds.max_bytes:
        raise TtlvError("too_large", f"the message is larger than {bounds.max_bytes} bytes")
    return HEADER + length


def _check_tag(tag: int) -> None:
    if not (0x420000 <= tag <= 0x42FFFF or 0x540000 <= tag <= 0x54FFFF):
        raise TtlvError("bad_tag", f"tag 0x{tag:06X} is outside the KMIP and extension ranges")


# -- decoding -------------------------------------------------------------------------------------------
_STRUCTURE, _BIG_INTEGER = ItemType.STRUCTURE, ItemType.BIG_INTEGER
_READERS: Final[dict[ItemType, Callable[[memoryview, int], tuple[int, ...]]]] = {
    ItemType.INTEGER: _I32.unpack_from,
    ItemType.ENUMERATION: _U32.unpack_from,
    ItemType.INTERVAL: _U32.unpack_from,
    ItemType.LONG_INTEGER: _I64.unpack_from,
    ItemType.DATE_TIME: _I64.unpack_from,
    ItemType.DATE_TIME_EXTENDED: _I64.unpack_from,
}
"""The fixed-size numbers, by how they are read (booleans are read apart: only 0 and 1 are valid)."""
_ZEROS: Final = bytes(8)
_new_item = tuple.__new__


class _Decoder:
    """One message's items, checked in this order for each: depth, count, header, tag, type, length, padding,
    value. Written flat (one loop per structure, no call per item) because a KMIP operation decodes dozens of
    items: its request, and its object's stored attributes."""

    def __init__(self, data: bytes | bytearray | memoryview, bounds: Bounds) -> None:
        self.data = memoryview(data)
        self.bounds = bounds
        self.count = 0

    def item(self, offset: int, end: int, depth: int) -> tuple[Item, int]:
        """The one item at ``offset`` and the offset after it."""
        items, stop = self.items(offset, end, depth, one=True)
        return items[0], stop

    def items(self, offset: int, end: int, depth: int, one: bool = False) -> tuple[tuple[Item, ...], int]:
        """The items from ``offset`` to ``end`` (only the first with ``one``), all at ``depth``."""
        if depth > self.bounds.max_depth:
            raise TtlvError("too_deep", f"structures nest deeper than {self.bounds.max_depth}")
        data, max_items, out = self.data, self.bounds.max_items, []
        head, types, fixed_sizes, readers = _HEAD.unpack_from, _TYPES, _FIXED, _READERS
        while offset < end:
            self.count += 1
            if self.count > max_items:
                raise TtlvError("too_many_items", f"the message holds more than {max_items} items")
            if end - offset < HEADER:
                raise TtlvError("truncated", "an item's header runs past the end of its structure")
            word, length = head(data, offset)
            tag = word >> 8
            if not (0x420000 <= tag <= 0x42FFFF or 0x540000 <= tag <= 0x54FFFF):
                _check_tag(tag)
            kind = types.get(word & 0xFF)
            if kind is None:
                raise TtlvError("bad_type", f"item type 0x{word & 0xFF:02X} does not exist")
            start = offset + HEADER
            padded = (length + 7) & ~7
            if padded > end - start:
                raise TtlvError("truncated", "an item's length runs past the end of its structure")
            offset = start + padded
            fixed = fixed_sizes.get(kind)
            if fixed is not None and length != fixed:
                raise TtlvError("bad_length", f"a {kind.name.lower()} is {fixed} bytes, not {length}")
            if (kind is _STRUCTURE or kind is _BIG_INTEGER) and length % 8:
                raise TtlvError("bad_length", f"a {kind.name.lower()}'s length is a multiple of 8")
            if padded != length and data[start + length : offset] != _ZEROS[: padded - length]:
                raise TtlvError("bad_padding", "padding bytes are not zero")
            value: Value
            if kind is _STRUCTURE:
                value = self.items(start, start + length, depth + 1)[0] if length else ()
            else:
                reader = readers.get(kind)
                if reader is not None:
                    value = int(reader(data, start)[0])
                elif kind is ItemType.BOOLEAN:
                    flag = _U64.unpack_from(data, start)[0]
                    if flag > 1:
                        raise TtlvError("bad_value", "a boolean is 0 or 1")
                    value = bool(flag)
                elif kind is ItemType.TEXT_STRING:
                    try:
                        value = str(data[start : start + length], "utf-8")
                    except UnicodeDecodeError:
                        raise TtlvError("bad_value", "a text string is not UTF-8") from None
                else:
                    value = bytes(data[start : start + length])  # byte string, big integer
            out.append(_new_item(Item, (tag, kind, value)))
            if one:
                break
        return tuple(out), offset


def decode(data: bytes | bytearray | memoryview, bounds: Bounds = DEFAULT_BOUNDS) -> Item:
    """One whole message: a structure, nothing after it, within ``bounds``."""
    frame = frame_length(bytes(data[:HEADER]), bounds)
    if len(data) < frame:
        raise TtlvError("truncated", "the message is shorter than its header says")
    if len(data) > frame:
        raise TtlvError("trailing_bytes", "bytes follow the message")
    item, _ = _Decoder(data, bounds).item(0, frame, 1)
    return item


def decode_item(data: bytes | bytearray | memoryview, bounds: Bounds = DEFAULT_BOUNDS) -> Item:
    """One item of any type (a stored attribute value), nothing after it."""
    if len(data) > bounds.max_bytes:
        raise TtlvError("too_large", f"the item is larger than {bounds.max_bytes} bytes")
    item, end = _Decoder(data, bounds).item(0, len(data), 1)
    if end != len(data):
        raise TtlvError("trailing_bytes", "bytes follow the item")
    return item


# -- encoding -------------------------------------------------------------------------------------------
def encode(item: Item, bounds: Bounds = DEFAULT_BOUNDS) -> bytes:
    out = bytearray()
    _encode(item, out, 1, bounds)
    if len(out) > bounds.max_bytes:
        raise TtlvError("too_large", f"the message is larger than {bounds.max_bytes} bytes")
    return bytes(out)


def _range(item: Item, low: int, high: int) -> int:
    value = item.value
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TtlvError("bad_value", f"{item.name} is not a {item.type.name.lower()} in range")
    return value


_PACKERS: Final[dict[ItemType, tuple[Callable[[int], bytes], int, int]]] = {
    ItemType.INTEGER: (_I32.pack, -(1 << 31), (1 << 31) - 1),
    ItemType.ENUMERATION: (_U32.pack, 0, (1 << 32) - 1),
    ItemType.INTERVAL: (_U32.pack, 0, (1 << 32) - 1),
    ItemType.LONG_INTEGER: (_I64.pack, -(1 << 63), (1 << 63) - 1),
    ItemType.DATE_TIME: (_I64.pack, -(1 << 63), (1 << 63) - 1),
    ItemType.DATE_TIME_EXTENDED: (_I64.pack, -(1 << 63), (1 << 63) - 1),
}


def _encode(item: Item, out: bytearray, depth: int, bounds: Bounds) -> None:
    if depth > bounds.max_depth:
        raise TtlvError("too_deep", f"structures nest deeper than {bounds.max_depth}")
    tag, kind, value = item
    if not (0x420000 <= tag <= 0x42FFFF or 0x540000 <= tag <= 0x54FFFF):
        _check_tag(tag)
    if kind is _STRUCTURE:
        head = len(out)
        out += _ZEROS
        for child in item.items:
            _encode(child, out, depth + 1, bounds)
        _HEAD.pack_into(out, head, tag << 8 | kind, len(out) - head - HEADER)
        return
    packer = _PACKERS.get(kind)
    if packer is not None:
        body = packer[0](_range(item, packer[1], packer[2]))
    elif kind is ItemType.BOOLEAN:
        if not isinstance(value, bool):
            raise TtlvError("bad_value", f"{item.name} is not a boolean")
        body = _U64.pack(int(value))
    elif kind is ItemType.TEXT_STRING:
        if not isinstance(value, str):
            raise TtlvError("bad_value", f"{item.name} is not a text string")
        body = value.encode("utf-8")
    else:
        if not isinstance(value, bytes) or (kind is _BIG_INTEGER and len(value) % 8):
            raise TtlvError("bad_value", f"{item.name} is not a {kind.name.lower()}")
        body = value
    length = len(body)
    out += _HEAD.pack(tag << 8 | kind, length)
    out += body
    if length % 8:
        out += _ZEROS[: -length % 8]
