"""TtlCache: entries expire, can be dropped by predicate, a flood of keys cannot grow it without bound, and an
entry in use is read again before it expires, without ever outliving its time to live."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from keysteward.ttlcache import AHEAD, TtlCache

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


def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the read ahead never finished"
        time.sleep(0.005)


def test_read_ahead_refreshes_an_entry_in_use_once_before_it_expires() -> None:
    """The last AHEAD of an entry's life: every get still answers the current value, and one read runs."""
    reads: list[str] = []
    cache: TtlCache[str, str] = TtlCache(0.3, load=lambda key: reads.append(key) or f"fresh-{len(reads)}")
    cache.put("a", "old")
    assert cache.get("a") == "old" and reads == []  # early in its life: no read
    time.sleep(0.3 * (1 - AHEAD) + 0.02)
    answers = {cache.get("a") for _ in range(200)}
    assert answers <= {"old", "fresh-1"}
    _wait_for(lambda: cache.get("a") == "fresh-1")
    assert reads == ["a"]  # one read for 200 gets in the window
    time.sleep(0.3 * (1 - AHEAD) - 0.05)
    assert cache.get("a") == "fresh-1"  # past the old entry's expiry, still inside the fresh one's life


def test_an_entry_nobody_uses_expires_as_before() -> None:
    reads: list[str] = []
    cache: TtlCache[str, str] = TtlCache(0.1, load=lambda key: reads.append(key) or "fresh")
    cache.put("a", "old")
    time.sleep(0.12)
    assert cache.get("a") is None and reads == []


def test_a_drop_during_a_read_ahead_wins() -> None:
    """A change made on this server drops the entry: what a read begun before it brings back is discarded."""
    started, release = threading.Event(), threading.Event()

    def slow(_key: str) -> str:
        started.set()
        release.wait(5)
        return "read-before-the-change"

    cache: TtlCache[str, str] = TtlCache(0.2, load=slow)
    cache.put("a", "old")
    time.sleep(0.2 * (1 - AHEAD) + 0.02)
    assert cache.get("a") == "old"
    assert started.wait(5)
    cache.drop("a")
    release.set()
    time.sleep(0.05)
    assert cache.get("a") is None
    cache.put("a", "new")  # and a put during a read ahead wins the same way
    time.sleep(0.2 * (1 - AHEAD) + 0.02)
    started.clear()
    release.clear()
    assert cache.get("a") == "new"
    assert started.wait(5)
    cache.put("a", "newer")
    release.set()
    time.sleep(0.05)
    assert cache.get("a") == "newer"


def test_a_read_ahead_that_finds_nothing_drops_and_one_that_fails_leaves_the_entry_to_expire() -> None:
    gone: TtlCache[str, str] = TtlCache(0.2, load=lambda _key: None)
    gone.put("a", "old")
    time.sleep(0.2 * (1 - AHEAD) + 0.02)
    gone.get("a")
    _wait_for(lambda: gone.get("a") is None)

    def broken(_key: str) -> str:
        raise ConnectionError("database down")

    failing: TtlCache[str, str] = TtlCache(0.2, load=broken)
    failing.put("a", "old")
    time.sleep(0.2 * (1 - AHEAD) + 0.02)
    assert failing.get("a") == "old"
    time.sleep(0.02)
    assert failing.get("a") == "old"  # still inside its life: kept
    time.sleep(0.2 * AHEAD)
    assert failing.get("a") is None  # and then expired, as without read ahead


def test_under_constant_use_a_value_changed_behind_the_cache_is_never_served_a_ttl_after_the_change() -> None:
    """The attacker keeps a revoked credential's entry hot by using it without pause: read ahead must not let
    the old value live on. Until the change, the entry never expires under its caller; after it, the old
    value is gone within one time to live."""
    ttl = 0.5
    source = {"a": "valid"}
    cache: TtlCache[str, str] = TtlCache(ttl, load=source.get)
    cache.put("a", "valid")
    started = time.monotonic()
    misses_before = 0
    revoked_at: float | None = None
    last_stale: float | None = None
    while time.monotonic() < started + 4 * ttl + 1.0:
        asked = time.monotonic()
        value = cache.get("a")
        if value is None:  # the caller's own read, as every user of the cache does on a miss
            if revoked_at is None:
                misses_before += 1
            value = source.get("a")
            if value is not None:
                cache.put("a", value)
        if revoked_at is None and asked > started + 4 * ttl:
            source.pop("a")  # revoked on another server
            revoked_at = time.monotonic()
        elif revoked_at is not None and value == "valid":
            last_stale = asked
    assert revoked_at is not None
    assert misses_before == 0  # read ahead kept it warm through four lifetimes
    assert last_stale is None or last_stale - revoked_at < ttl
    assert cache.get("a") is None
