"""Failure counting for unauthenticated endpoints: per source, and (optionally) overall, in a sliding window.

A source is an IPv4 address or an IPv6 /64 (one host usually holds a whole /64). Only failures count:
a caller that keeps succeeding is never limited. Memory is bounded: at most ``max_sources`` sources are
tracked, the least recently seen forgotten first.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable


def source_key(host: str) -> str:
    """The unit a limit applies to: the address itself, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureLimiter:
    """At most ``per_source`` failures per source and ``overall`` failures in all within ``window`` seconds.

    ``overall=None`` sets no overall limit: for endpoints where many failing sources must not lock out the
    good ones (key release), unlike the unseal, where the share check itself is what needs protecting.
    """

    def __init__(
        self,
        per_source: int,
        overall: int | None,
        window: float,
        *,
        max_sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_source < 1 or (overall is not None and overall < 1) or window <= 0 or max_sources < 1:
            raise ValueError("failure limits and the window must be positive")
        self.per_source = per_source
        self.overall = overall
        self.window = window
        self.max_sources = max_sources
        self._clock = clock
        self._lock = threading.Lock()
        self._sources: OrderedDict[str, deque[float]] = OrderedDict()
        self._all: deque[float] = deque()

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def retry_after(self, host: str) -> float:
        """Seconds until ``host`` may fail again without being limited; 0 when it is not limited now."""
        key = source_key(host)
        now = self._clock()
        with self._lock:
            self._expire(self._all, now)
            waits = []
            if self.overall is not None and len(self._all) >= self.overall:
                waits.append(self._all[len(self._all) - self.overall] + self.window - now)
            times = self._sources.get(key)
            if times is not None:
                self._expire(times, now)
                if len(times) >= self.per_source:
                    waits.append(times[len(times) - self.per_source] + self.window - now)
            return max(waits, default=0.0)

    def fail(self, host: str) -> None:
        """Count one failure of ``host``."""
        key = source_key(host)
        now = self._clock()
        with self._lock:
            times = self._sources.pop(key, None)
            if times is None:
                times = deque(maxlen=self.per_source)
                while len(self._sources) >= self.max_sources:
                    self._sources.popitem(last=False)
            times.append(now)
            self._sources[key] = times  # most recently seen last
            if self.overall is not None:
                self._all.append(now)
                while len(self._all) > self.overall:
                    self._all.popleft()
