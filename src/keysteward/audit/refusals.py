"""Refusals of callers nobody has proven, counted: one audit record per interval per (tenant, action, reason).

Anyone can send a release request naming a tenant, or an unseal share. Recording each refusal on its own
would let an anonymous client write as many signed records into a tenant's chain as it sends requests,
with text of its choosing, and push the real events out of view. Instead each refusal is counted here, and
a background thread writes one record per (tenant, action, reason) that was refused in the interval, with
the count, when the first and last came, up to :data:`MAX_SOURCES` source addresses (and how many more),
and one sample of what the caller named, escaped and cut to :data:`MAX_SAMPLE` characters. The records
are written every ``[audit] refusal_interval`` seconds and once more when the server stops; their actor is
``anonymous`` (``audit list --actor anonymous`` shows them, ``--outcome ok`` or another actor hides them).

Refusals of proven callers (a token, a certificate, instance evidence that verified) are not counted here:
they keep one record each.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keysteward.audit.log import AuditLog
from keysteward.errors import BadRequest, KeystewardError

log = logging.getLogger("keysteward.audit.refusals")
ACTOR = "anonymous"
MAX_SAMPLE = 128
MAX_SOURCES = 8
MAX_KEYS = 4096
MIN_INTERVAL = 0.05
MAX_INTERVAL = 3600.0


def escaped(text: str, limit: int = MAX_SAMPLE) -> str:
    """``text`` as printable ASCII (backslash escapes for anything else), at most ``limit`` characters."""
    out = text[: limit * 4].encode("unicode_escape").decode("ascii")
    return out[:limit]


@dataclass
class _Count:
    target: str
    sample: str
    first: datetime
    last: datetime
    count: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    more_sources: int = 0

    def add(self, source: str, at: datetime) -> None:
        self.count += 1
        self.first, self.last = min(self.first, at), max(self.last, at)
        self._source(source, 1)

    def merge(self, other: _Count) -> None:
        self.count += other.count
        self.first, self.last = min(self.first, other.first), max(self.last, other.last)
        for source, times in other.sources.items():
            self._source(source, times)
        self.more_sources += other.more_sources

    def _source(self, source: str, times: int) -> None:
        if source in self.sources or len(self.sources) < MAX_SOURCES:
            self.sources[source] = self.sources.get(source, 0) + times
        else:
            self.more_sources += times


Key = tuple[str, str, str]  # tenant id, action, reason


class RefusalTally:
    def __init__(self, audit: AuditLog, interval: float) -> None:
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise BadRequest(
                f"audit.refusal_interval must be from {MIN_INTERVAL} to {MAX_INTERVAL} seconds", code="bad_setting"
            )
        self.audit = audit
        self.interval = interval
        self.dropped = 0
        """Refusals not counted because :data:`MAX_KEYS` distinct (tenant, action, reason) were pending."""
        self._lock = threading.Lock()
        self._counts: dict[Key, _Count] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self, tenant_id: str, action: str, reason: str, *, source: str, target: str, sample: str) -> None:
        """One refusal of an unproven caller (``sample``: what it named, escaped here; ``source``: its address)."""
        now = datetime.now(UTC)
        key = (tenant_id, action, reason)
        with self._lock:
            entry = self._counts.get(key)
            if entry is None:
                if len(self._counts) >= MAX_KEYS:
                    self.dropped += 1
                    return
                entry = self._counts[key] = _Count(escaped(target), escaped(sample), now, now)
            entry.add(escaped(source, 64), now)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="keysteward-refusals", daemon=True)
                self._thread.start()

    def pending(self) -> int:
        with self._lock:
            return sum(c.count for c in self._counts.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> int:
        """Write one record per pending (tenant, action, reason); returns how many were written."""
        with self._lock:
            counts, self._counts = self._counts, {}
        written = 0
        for (tenant_id, action, reason), entry in counts.items():
            try:
                self.audit.record(tenant_id, **self._fields(action, reason, entry))
                written += 1
            except KeystewardError as exc:
                log.warning("refusal counts not recorded (%s); they are kept for the next round", exc.code)
                with self._lock:
                    again = self._counts.setdefault((tenant_id, action, reason), entry)
                    if again is not entry:
                        again.merge(entry)
        return written

    def _fields(self, action: str, reason: str, entry: _Count) -> dict[str, Any]:
        details: dict[str, Any] = {
            "count": entry.count,
            "interval_seconds": self.interval,
            "first_at": entry.first.isoformat(timespec="seconds"),
            "last_at": entry.last.isoformat(timespec="seconds"),
            "sources": sorted(entry.sources),
            "more_sources": entry.more_sources,
            "sample": entry.sample,
        }
        return {
            "actor": ACTOR,
            "action": action,
            "target": entry.target,
            "outcome": "denied",
            "reason": reason,
            "details": details,
        }

    def stop(self) -> None:
        """Stop the thread and write what is pending (before the audit log closes and the server seals)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)
        self.flush()
