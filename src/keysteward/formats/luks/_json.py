"""Strict JSON reading and cryptsetup-compatible JSON writing for LUKS2 metadata.

Reading refuses what json-c would read differently or what could hurt us: duplicate keys, NaN and
Infinity, integers beyond 64 bits, lone surrogates, nesting deeper than :data:`MAX_DEPTH`. Writing
matches json-c's ``JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE`` as cryptsetup uses it:
no spaces, UTF-8 as is, ``/`` unescaped, so metadata that cryptsetup wrote re-encodes byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from keysteward.formats.luks.errors import LuksFormatError

MAX_DEPTH = 32
MAX_ARRAY = 64
MAX_STRING = 4096
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1

JsonObject = dict[str, Any]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
    out: JsonObject = {}
    for key, value in pairs:
        if key in out:
            raise LuksFormatError(f"LUKS2 JSON has the key {key[:40]!r} twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise LuksFormatError(f"LUKS2 JSON contains {name}, which is not JSON")


def _check_tree(root: Any) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise LuksFormatError(f"LUKS2 JSON nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_string(key)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_string(value)
        elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value <= U64_MAX:
            raise LuksFormatError("LUKS2 JSON has an integer beyond 64 bits")


def _check_string(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LuksFormatError("LUKS2 JSON has a string that is not valid Unicode") from exc


def loads_object(text: bytes) -> JsonObject:
    """Parse one JSON object that fills ``text`` exactly."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LuksFormatError(f"LUKS2 JSON area is not UTF-8 (byte {exc.start})") from exc
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    try:
        value, end = decoder.raw_decode(decoded)
    except RecursionError as exc:
        raise LuksFormatError("LUKS2 JSON nests too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and int() refusing an over-long number
        raise LuksFormatError(f"LUKS2 JSON area is not JSON: {str(exc)[:120]}") from exc
    if end != len(decoded):
        raise LuksFormatError(f"LUKS2 JSON area has bytes after the JSON object (at offset {end})")
    if not isinstance(value, dict):
        raise LuksFormatError("LUKS2 JSON is not an object")
    _check_tree(value)
    return value


def dumps(value: Mapping[str, Any]) -> bytes:
    """Encode as cryptsetup does (json-c plain, no slash escaping)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise LuksFormatError(f"LUKS2 metadata cannot be encoded as JSON: {exc}") from exc


def merge(raw: Mapping[str, Any], known: Mapping[str, Any], drop: tuple[str, ...] = ()) -> JsonObject:
    """``raw`` with ``known`` fields set in place (new ones appended) and ``drop`` fields removed."""
    out = {key: value for key, value in raw.items() if key not in drop}
    out.update(known)
    return out


# -- typed getters ---------------------------------------------------------------------------------


def get_object(obj: Mapping[str, Any], key: str, where: str) -> JsonObject:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise LuksFormatError(f"{where}: {key!r} is missing or not an object")
    return value


def get_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise LuksFormatError(f"{where}: {key!r} is missing or not a non-empty string")
    if len(value) > MAX_STRING or "\x00" in value:
        raise LuksFormatError(f"{where}: {key!r} is too long or contains NUL")
    return value


def get_int(obj: Mapping[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise LuksFormatError(f"{where}: {key!r} is missing or not an integer")
    if not low <= value <= high:
        raise LuksFormatError(f"{where}: {key!r} = {value} is out of range {low}..{high}")
    return value


def parse_u64(text: str, where: str) -> int:
    """A 64-bit number written as a decimal string, as LUKS2 stores offsets and sizes."""
    if not text or len(text) > 20 or not text.isascii() or not text.isdigit():
        raise LuksFormatError(f"{where}: {text[:24]!r} is not a decimal number")
    number = int(text)
    if number > U64_MAX:
        raise LuksFormatError(f"{where}: {text!r} is beyond 64 bits")
    return number


def get_u64(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not isinstance(value, str):
        raise LuksFormatError(f"{where}: {key!r} is missing or not a decimal string")
    return parse_u64(value, f"{where}: {key!r}")


def get_str_list(obj: Mapping[str, Any], key: str, where: str, max_items: int = MAX_ARRAY) -> tuple[str, ...]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise LuksFormatError(f"{where}: {key!r} is missing or not an array")
    if len(value) > max_items:
        raise LuksFormatError(f"{where}: {key!r} has {len(value)} entries, at most {max_items} allowed")
    items: list[str] = []
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_STRING:
            raise LuksFormatError(f"{where}: {key!r} must hold strings only")
        items.append(item)
    return tuple(items)


def object_id(key: str, where: str, limit: int) -> int:
    """An object's key in a numbered section ("0".."limit-1", no leading zeros)."""
    if not key.isascii() or not key.isdigit() or (len(key) > 1 and key[0] == "0") or len(key) > 3:
        raise LuksFormatError(f"{where}: key {key[:24]!r} is not a number")
    number = int(key)
    if number >= limit:
        raise LuksFormatError(f"{where}: id {number} is out of range 0..{limit - 1}")
    return number


def get_id_list(obj: Mapping[str, Any], key: str, where: str, limit: int) -> tuple[int, ...]:
    ids = tuple(object_id(item, f"{where}: {key!r}", limit) for item in get_str_list(obj, key, where, limit))
    if len(set(ids)) != len(ids):
        raise LuksFormatError(f"{where}: {key!r} lists an id twice")
    return ids


def get_b64(obj: Mapping[str, Any], key: str, where: str, low: int, high: int) -> bytes:
    text = get_str(obj, key, where)
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise LuksFormatError(f"{where}: {key!r} is not base64") from exc
    if not low <= len(raw) <= high:
        raise LuksFormatError(f"{where}: {key!r} is {len(raw)} bytes, expected {low}..{high}")
    return raw


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
