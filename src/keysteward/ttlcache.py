"""A small map whose entries expire: how long a server trusts what it read from the database.

Used for token identities, client-certificate identities and key state, so that the hot path needs
no database read; every user drops entries itself when it changes what they describe.

**Read ahead.** A cache given a ``load`` function reads an entry again before it expires: the first
:meth:`TtlCache.get` in the last :data:`AHEAD` of its life hands the key to one background thread, which
loads it and puts the fresh value (or drops the entry when ``load`` answers None: the row is gone), while
every caller goes on getting the current value, which is still inside its time to live. Without it, every
entry in use expired at once each second, and every request of that moment read the database itself:
under load, tens of requests per second took the slow path together (a thread each, a read each), which
was most of the XKS listener's tail latency (py-spy, ``bench/xks.py``). The trust bound is unchanged: a
value is never used longer than ``ttl`` after the read that made it. A :meth:`put`, :meth:`drop`,
:meth:`drop_where` or :meth:`clear` while a read ahead is under way wins: its result is discarded, so a
change made on this server still takes effect here at once, and nothing read before a seal is put back
after it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

AHEAD = 0.3
"""The part of an entry's life, at its end, in which a get schedules its read ahead."""
log = logging.getLogger("keysteward.cache")


class _Reader:
    """The one thread per process that runs every cache's reads ahead, in the order they were asked."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="keysteward-read-ahead", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            self._jobs.get()()


_READER = _Reader()


class TtlCache(Generic[K, V]):
    def __init__(self, ttl: float, max_entries: int = 10_000, *, load: Callable[[K], V | None] | None = None) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[K, tuple[float, V]] = {}
        self._load = load
        self._ahead = ttl * AHEAD
        self._reading: set[K] = set()
        """Keys whose read ahead is queued or running (one at a time per key)."""
        self._epoch = 0
        """Counts puts, drops and clears: a read ahead that began before one puts nothing."""

    def get(self, key: K) -> V | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        left = hit[0] - time.monotonic()
        if left <= 0:
            return None
        if left < self._ahead and self._load is not None and key not in self._reading:
            self._read_ahead(key)
        return hit[1]

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._epoch += 1  # newer than what a read ahead under way may bring back
            self._put(key, value)

    def _put(self, key: K, value: V, read_at: float | None = None) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # a flood of distinct keys costs database reads, never memory
        self._entries[key] = ((time.monotonic() if read_at is None else read_at) + self.ttl, value)

    def drop(self, key: K) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.pop(key, None)

    def drop_where(self, doomed: Callable[[K, V], bool]) -> None:
        with self._lock:
            self._epoch += 1
            for key in [k for k, (_, v) in self._entries.items() if doomed(k, v)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.clear()

    def _read_ahead(self, key: K) -> None:
        with self._lock:
            if key in self._reading:
                return
            self._reading.add(key)
            epoch = self._epoch
        _READER.submit(lambda: self._reread(key, epoch))

    def _reread(self, key: K, epoch: int) -> None:
        assert self._load is not None
        value: Any = _FAILED
        read_at = time.monotonic()  # the fresh value's life counts from before its read, however long it took
        try:
            value = self._load(key)
        except Exception as exc:  # noqa: BLE001 - the entry then simply expires, and its next reader reads it
            log.debug("a cache entry could not be read ahead (%s)", type(exc).__name__)
        with self._lock:
            self._reading.discard(key)
            if epoch != self._epoch or value is _FAILED:
                return
            if value is None:
                self._entries.pop(key, None)  # gone (deleted, retired): its next reader finds out at once
            else:
                self._put(key, value, read_at)


_FAILED = object()
