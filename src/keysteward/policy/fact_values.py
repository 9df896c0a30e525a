"""The scalar checks behind policy facts: text, numbers, booleans, hex, maps, tags, times and addresses.

Each takes the value and its path in the request (``principal.tags``) and returns it normalised, or raises
:class:`~keysteward.policy.errors.PolicyRequestInvalid` naming the path; ``freeze`` and ``thaw`` make a
checked request immutable and back. Pure functions, used by :mod:`keysteward.policy.facts` as ``check``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from keysteward.policy.errors import PolicyRequestInvalid

MAX_TEXT: Final = 256
MAX_TAGS: Final = 64
MAX_LONG: Final = 2**63 - 1
HEX = re.compile(r"[0-9a-fA-F]*")


def fail(path: str, what: str) -> PolicyRequestInvalid:
    return PolicyRequestInvalid(f"{path} {what}")


def text(value: Any, path: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not value and not empty):
        raise fail(path, f"must be a string of {0 if empty else 1}-{MAX_TEXT} characters")
    if not is_unicode(value):
        raise fail(path, "must be valid Unicode (no lone surrogates)")
    return value


def is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def long_int(value: Any, path: str, low: int = 0, high: int = MAX_LONG) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fail(path, f"must be an integer from {low} to {high}")
    return value


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise fail(path, "must be true or false")
    return value


def hex_text(value: Any, path: str, digits: int | None = None) -> str:
    found = text(value, path)
    if not HEX.fullmatch(found) or len(found) % 2 or (digits is not None and len(found) != digits):
        size = f"{digits} hex digits" if digits else "an even number of hex digits"
        raise fail(path, f"must be {size}")
    return found.lower()


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise fail(path, "must be an object")
    return value


def only(value: Mapping[str, Any], allowed: frozenset[str] | tuple[str, ...], path: str) -> None:
    unknown = sorted(str(key)[:64] for key in value if key not in allowed)
    if unknown:
        raise fail(path, f"has unknown field(s): {', '.join(unknown[:5])}")


def tags(value: Any, path: str) -> dict[str, str]:
    tags = mapping(value, path)
    if len(tags) > MAX_TAGS:
        raise fail(path, f"has more than {MAX_TAGS} entries")
    return {text(k, f"{path} key"): text(v, f"{path}.{str(k)[:64]}", empty=True) for k, v in tags.items()}


def moment(value: Any, path: str) -> datetime:
    if isinstance(value, str) and len(value) <= 64:
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise fail(path, "must be an ISO 8601 time with a UTC offset") from None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise fail(path, "must be an ISO 8601 time with a UTC offset")
    return value


def address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as Cedar's ``ip()`` reads it: an IPv4 client seen by a dual-stack socket becomes IPv4."""
    if isinstance(value, str):
        return _address_text(value)
    return _address(value)


@functools.lru_cache(maxsize=4096)
def _address_text(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """:func:`_address` of a text, remembered (addresses are immutable; a refusal is not remembered)."""
    return _address(value)


def _address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise fail("source_ip", "must be an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise fail("source_ip", "must be an address without a zone (%...)")
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


_SCALARS: Final = frozenset({str, int, bool, float, type(None)})


def freeze(value: Any) -> Any:
    """``value`` immutable: its dicts read-only mappings, its lists tuples (scalars pass without a call: a
    policy request freezes dozens of them)."""
    if isinstance(value, dict):
        return MappingProxyType({k: v if type(v) in _SCALARS else freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(v if type(v) in _SCALARS else freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value
