"""Which records a Locate's attributes select (beyond the indexed Object Type, State and Name).

Each attribute given must hold a value equal in type and value to one of the object's values. A date-time
attribute given twice is a range (KMIP 1.2 and later): the object's value lies between the two, inclusive.
"""

from __future__ import annotations

from collections.abc import Callable

from keysteward.access.kmip_actions import KmipRecord
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip import attributes as attrs


def matcher(wanted: list[tuple[str, Item]]) -> Callable[[KmipRecord], bool]:
    ranges: dict[str, tuple[int, int]] = {}
    exact: list[tuple[str, Item]] = []
    dates: dict[str, list[int]] = {}
    for name, want in wanted:
        if want.type is ItemType.DATE_TIME and isinstance(want.value, int):
            dates.setdefault(name, []).append(want.value)
        else:
            exact.append((name, want))
    for name, values in dates.items():
        if len(values) == 2:
            ranges[name] = (min(values), max(values))
        else:
            exact.extend((name, Item(0, ItemType.DATE_TIME, v)) for v in values)

    def match(record: KmipRecord) -> bool:
        stored = dict(attrs.all_attributes(record))
        for name, want in exact:
            if not any(v.type is want.type and v.value == want.value for v in stored.get(name, [])):
                return False
        for name, (low, high) in ranges.items():
            values = stored.get(name, [])
            if not any(v.type is ItemType.DATE_TIME and isinstance(v.value, int) and low <= v.value <= high
                       for v in values):  # fmt: skip
                return False
        return True

    return match
