"""Alerts (a suspected clone, first of all) POSTed as JSON to the operator's webhook, off the request path.

Delivery is best effort with a few retries; the audit log, not the webhook, is the record. Alerts carry
identities and ids, never key material.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

log = logging.getLogger("keysteward.alerts")
RETRIES = 3
QUEUE_LIMIT = 10_000


class Alerts:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, alert: dict[str, Any]) -> None:
        log.warning("alert %s: %s", alert.get("alert"), {k: v for k, v in alert.items() if k != "alert"})
        if not self.url:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="keysteward-alerts", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.failed += 1
            log.error("alert queue full: an alert was not sent to the webhook (it is in the audit log)")

    def _deliver(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout) as client:
            while True:
                alert = self._queue.get()
                if alert is None:
                    return
                for attempt in range(RETRIES):
                    try:
                        client.post(self.url, json=alert).raise_for_status()
                        self.sent += 1
                        break
                    except httpx.HTTPError as exc:
                        if attempt == RETRIES - 1:
                            self.failed += 1
                            log.error("alert webhook failed after %d tries: %s", RETRIES, type(exc).__name__)
                        else:
                            time.sleep(0.2 * 2**attempt)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
