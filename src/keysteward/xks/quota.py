"""Per-prefix request quotas: a token bucket per external key store (AWS KMS's default is 1,800 TPS)."""

from __future__ import annotations

import threading
import time


class Quotas:
    """``rate`` requests per second per key, with bursts of up to one second's worth."""

    def __init__(self, rate: float, max_keys: int = 10_000) -> None:
        if not rate > 0:
            raise ValueError("a quota must be a positive rate")
        self.rate = float(rate)
        self.burst = max(float(rate), 1.0)
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            allowed = tokens >= 1.0
            if len(self._buckets) >= self.max_keys and key not in self._buckets:
                self._buckets.clear()  # only known prefixes reach here; bounded anyway
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed
