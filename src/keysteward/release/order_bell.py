"""The bell that wakes a host's long-polled order fetch the moment an order for it commits.

A host agent asks ``GET /v1/host/orders?wait=N``: with nothing pending, the server holds the request until
an order for that host commits on this server (:meth:`OrderBell.ring`, called after the commit) or ``N``
seconds pass. Orders committed by another server of an HA cluster ring no bell here: the waiting request
looks in the database again every :data:`RECHECK_SECONDS`, so they arrive within that bound.

Waiting costs an asyncio event on the server's loop, not a worker thread, so a thousand idle hosts hold
no threads. :meth:`ring` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

RECHECK_SECONDS: Final = 0.25
MAX_WAIT_SECONDS: Final = 25.0

Key = tuple[str, str]
T = TypeVar("T")


class OrderBell:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[Key, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def ring(self, tenant_id: str, host: str) -> None:
        """An order for ``host`` of ``tenant_id`` has committed: wake its waiting fetches."""
        with self._lock:
            waiters = list(self._waiting.get((tenant_id, host), ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has closed (server shutting down): nobody is waiting any more
                pass

    async def wait_for(
        self, tenant_id: str, host: str, seconds: float, look: Callable[[], Awaitable[list[T]]]
    ) -> list[T]:
        """``look()`` until it finds something, woken by :meth:`ring` or every :data:`RECHECK_SECONDS`,
        for at most ``seconds``; what it found last (empty when the time ran out)."""
        key = (tenant_id, host)
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._waiting.setdefault(key, set()).add(entry)
        try:
            deadline = loop.time() + min(max(seconds, 0.0), MAX_WAIT_SECONDS)
            while True:
                event.clear()  # cleared before looking: a ring during the look is not lost
                found = await look()
                left = deadline - loop.time()
                if found or left <= 0:
                    return found
                try:
                    await asyncio.wait_for(event.wait(), min(left, RECHECK_SECONDS))
                except TimeoutError:
                    pass
        finally:
            with self._lock:
                waiters = self._waiting.get(key)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiting[key]

    def waiting(self) -> int:
        """How many fetches wait now (for tests and metrics)."""
        with self._lock:
            return sum(len(w) for w in self._waiting.values())
