"""The bell that ends a host's long-polled order fetch (keysteward.release.order_bell)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from keysteward.release import order_bell
from keysteward.release.order_bell import OrderBell

pytestmark = pytest.mark.unit


def test_a_ring_from_another_thread_ends_the_wait_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(order_bell, "RECHECK_SECONDS", 10.0)  # only the bell can wake it in time
    bell = OrderBell()
    orders: list[str] = []
    looks = 0

    async def look() -> list[str]:
        nonlocal looks
        looks += 1
        return list(orders)

    async def main() -> tuple[list[str], float]:
        began = time.monotonic()

        def place() -> None:
            time.sleep(0.2)
            orders.append("order-1")
            bell.ring("acme", "other-host")  # another host's bell wakes nobody here
            bell.ring("globex", "host-a")  # nor another tenant's host of the same name
            bell.ring("acme", "host-a")

        threading.Thread(target=place).start()
        found = await bell.wait_for("acme", "host-a", 5.0, look)
        return found, time.monotonic() - began

    found, took = asyncio.run(main())
    assert found == ["order-1"] and 0.2 <= took < 1.0
    assert bell.waiting() == 0


def test_the_wait_looks_again_on_its_own_for_orders_of_other_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(order_bell, "RECHECK_SECONDS", 0.05)
    bell = OrderBell()
    calls = 0

    async def look() -> list[int]:
        nonlocal calls
        calls += 1
        return [calls] if calls == 4 else []

    assert asyncio.run(bell.wait_for("acme", "host-a", 5.0, look)) == [4]


def test_nothing_comes_the_wait_ends_empty_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(order_bell, "MAX_WAIT_SECONDS", 0.3)
    bell = OrderBell()

    async def look() -> list[str]:
        return []

    began = time.monotonic()
    assert asyncio.run(bell.wait_for("acme", "host-a", 3600, look)) == []  # held at most MAX_WAIT_SECONDS
    assert 0.25 <= time.monotonic() - began < 2.0
    began = time.monotonic()
    assert asyncio.run(bell.wait_for("acme", "host-a", -5, look)) == []  # a negative wait is no wait
    assert time.monotonic() - began < 0.2 and bell.waiting() == 0


def test_a_failing_look_leaves_no_waiter_behind() -> None:
    bell = OrderBell()

    async def look() -> list[str]:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError):
        asyncio.run(bell.wait_for("acme", "host-a", 1.0, look))
    assert bell.waiting() == 0
    bell.ring("acme", "host-a")  # nobody waits: harmless


def test_a_ring_during_a_look_is_not_lost() -> None:
    bell = OrderBell()
    seen: list[int] = []

    async def look() -> list[int]:
        seen.append(1)
        if len(seen) == 1:
            bell.ring("acme", "host-a")  # during the look: not lost, the next look comes at once
        return [1] if len(seen) == 2 else []

    began = time.monotonic()
    assert asyncio.run(bell.wait_for("acme", "host-a", 5.0, look)) == [1]
    assert time.monotonic() - began < order_bell.RECHECK_SECONDS
