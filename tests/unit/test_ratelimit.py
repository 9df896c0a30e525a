"""Failure limiting per source and overall (keysteward.ratelimit), on a hand-driven clock."""

from __future__ import annotations

import pytest

from keysteward.ratelimit import FailureLimiter, source_key

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_source_is_limited_after_its_failures_and_free_again_after_the_window() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 100, 60.0, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("192.0.2.7") == 0
        limiter.fail("192.0.2.7")
    assert limiter.retry_after("192.0.2.7") == pytest.approx(60.0)
    assert limiter.retry_after("192.0.2.8") == 0  # other sources are not affected
    clock.now += 30
    assert limiter.retry_after("192.0.2.7") == pytest.approx(30.0)
    clock.now += 30
    assert limiter.retry_after("192.0.2.7") == 0


def test_the_overall_limit_holds_across_many_sources() -> None:
    clock = Clock()
    limiter = FailureLimiter(5, 10, 60.0, clock=clock)
    for i in range(10):
        limiter.fail(f"198.51.100.{i}")
    assert limiter.retry_after("203.0.113.1") == pytest.approx(60.0)
    clock.now += 61
    assert limiter.retry_after("203.0.113.1") == 0


def test_ipv6_sources_are_grouped_by_64_and_mapped_ipv4_is_ipv4() -> None:
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_key("unknown") == "unknown"
    assert len(source_key("x" * 1000)) == 64
    limiter = FailureLimiter(2, 100, 60.0, clock=Clock())
    limiter.fail("2001:db8:1:2::1")
    limiter.fail("2001:db8:1:2::2")
    assert limiter.retry_after("2001:db8:1:2::3") > 0


def test_memory_is_bounded_by_max_sources() -> None:
    limiter = FailureLimiter(1, 10_000, 60.0, max_sources=8, clock=Clock())
    for i in range(1000):
        limiter.fail(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._sources) == 8
    assert limiter.retry_after("10.0.3.231") > 0  # the most recent ones are kept


@pytest.mark.parametrize(("per_source", "overall", "window"), [(0, 1, 1.0), (1, 0, 1.0), (1, 1, 0.0), (-1, 1, 1.0)])
def test_bad_limits_are_refused(per_source: int, overall: int, window: float) -> None:
    with pytest.raises(ValueError):
        FailureLimiter(per_source, overall, window)


def test_no_overall_limit_lets_every_other_source_through() -> None:
    """The release path's limiter: many failing sources never lock out one that has not failed."""
    clock = Clock()
    limiter = FailureLimiter(2, None, 60.0, clock=clock)
    for i in range(5000):
        limiter.fail(f"10.1.{i // 256}.{i % 256}")
    assert limiter.retry_after("192.0.2.1") == 0
    assert not limiter._all  # nothing kept for an overall count
    limiter.fail("192.0.2.1")
    limiter.fail("192.0.2.1")
    assert limiter.retry_after("192.0.2.1") == pytest.approx(60.0)
