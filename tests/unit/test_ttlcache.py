"""TtlCache: entries expire, can be dropped by predicate, and a flood of keys cannot grow it without bound."""

from __future__ import annotations

import time

import pytest

from keysteward.ttlcache import TtlCache

pytestmark = pytest.mark.unit


def test_entries_expire() -> None:
    cache: TtlCache[str, int] = TtlCache(0.05)
    cache.put("a", 1)
    assert cache.get("a") == 1
    time.sleep(0.06)
    assert cache.get("a") is None


def test_drop_where_and_clear() -> None:
    cache: TtlCache[tuple[str, int], str] = TtlCache(60)
    for key_id in ("k1", "k2"):
        for version in (1, 2):
            cache.put((key_id, version), f"{key_id}v{version}")
    cache.drop_where(lambda key, _value: key[0] == "k1")
    assert cache.get(("k1", 1)) is None and cache.get(("k1", 2)) is None and cache.get(("k2", 2)) == "k2v2"
    cache.clear()
    assert cache.get(("k2", 1)) is None


def test_bounded() -> None:
    cache: TtlCache[int, int] = TtlCache(60, max_entries=100)
    for i in range(1000):
        cache.put(i, i)
    assert len(cache._entries) <= 100 and cache.get(999) == 999
