"""Publish signed checkpoints of every audit chain head to the configured sinks, off the request path.

A background thread wakes every ``[audit] checkpoint_interval`` seconds (60 by default), when a destroy
record is appended (key, key version, volume), when the server unseals, and once more as the server
stops. Each round reads the committed heads, signs a checkpoint of every head that moved since that
sink last took one (all of them in the first round), and hands them to each sink. A sink that fails
is logged and gets the same heads again in the next round; the others go on. While the server is
sealed there is no key to sign with, and rounds publish nothing.

A destroy wakes the thread before its transaction commits; the round waits (up to
:data:`COMMIT_WAIT` seconds) until the head has reached the destroy record, so the checkpoint covers it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from keysteward.audit import checkpoint
from keysteward.audit.log import AuditLog
from keysteward.audit.sinks import Sink, SinkFailed, parse_sink
from keysteward.errors import BadRequest, KeystewardError

log = logging.getLogger("keysteward.audit.checkpoints")
COMMIT_WAIT = 5.0
COMMIT_POLL = 0.02
MIN_INTERVAL = 0.05
MAX_INTERVAL = 3600.0


class CheckpointPublisher:
    def __init__(self, audit: AuditLog, sinks: Sequence[Sink], interval: float) -> None:
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise BadRequest(
                f"audit.checkpoint_interval must be from {MIN_INTERVAL} to {MAX_INTERVAL} seconds", code="bad_setting"
            )
        self.audit = audit
        self.sinks = list(sinks)
        self.interval = interval
        self.published = 0
        self.failed = 0
        self._last: list[dict[str, tuple[int, str]]] = [{} for _ in self.sinks]
        self._awaiting: dict[str, int] = {}
        self._awaiting_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._round = threading.Lock()
        self._thread: threading.Thread | None = None
        audit.on_destroy.append(self._destroyed)

    @classmethod
    def from_settings(
        cls, audit: AuditLog, specs: Sequence[str], data_dir: Path, *, interval: float, webhook_timeout: float
    ) -> CheckpointPublisher:
        return cls(audit, [parse_sink(s, data_dir, webhook_timeout=webhook_timeout) for s in specs], interval)

    def _destroyed(self, tenant_id: str, seq: int) -> None:
        with self._awaiting_lock:
            self._awaiting[tenant_id] = max(seq, self._awaiting.get(tenant_id, 0))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self.sinks and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keysteward-checkpoints", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread after one last round (call before sealing: a sealed server cannot sign)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=COMMIT_WAIT + 10)
            self._thread = None
        for sink in self.sinks:
            sink.close()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self.publish_round()
            except Exception:
                log.exception("audit checkpoint round failed")
            if stopping:
                return

    def publish_round(self) -> int:
        """One round; returns how many checkpoints the sinks took."""
        if not self.sinks:
            return 0
        with self._round:
            heads = self._heads_after_commits()
            signed: dict[tuple[str, int, str], str] = {}
            took = 0
            for index, sink in enumerate(self.sinks):
                last = self._last[index]
                due = [h for h in heads if last.get(h[0]) != (h[1], h[2])]
                lines = self._sign(due, signed)
                if lines is None:
                    break  # sealed: nothing can be signed until the next unseal
                try:
                    sink.publish(lines)
                except SinkFailed as exc:
                    self.failed += 1
                    log.warning("audit checkpoints not published: %s", exc.message)
                    continue
                except KeystewardError as exc:
                    self.failed += 1
                    log.warning("audit checkpoints not published to %s: %s", sink.label, exc.code)
                    continue
                for tenant_id, seq, hash_hex in due:
                    last[tenant_id] = (seq, hash_hex)
                took += len(lines)
            self.published += took
            return took

    def _sign(self, due: list[tuple[str, int, str]], signed: dict[tuple[str, int, str], str]) -> list[str] | None:
        """The checkpoint lines of ``due`` (each head signed once per round), or None while sealed."""
        lines = []
        for head in due:
            if head not in signed:
                cp = self.audit.sign_checkpoint(*head)
                if cp is None:
                    return None
                signed[head] = checkpoint.encode(cp)
            lines.append(signed[head])
        return lines

    def _heads_after_commits(self) -> list[tuple[str, int, str]]:
        """The heads, once every destroy record this round was woken for has committed (or a timeout)."""
        with self._awaiting_lock:
            awaiting, self._awaiting = self._awaiting, {}
        deadline = time.monotonic() + COMMIT_WAIT
        while True:
            heads = self.audit.heads()
            reached = {tenant: seq for tenant, seq, _ in heads}
            if all(reached.get(t, 0) >= s for t, s in awaiting.items()) or time.monotonic() >= deadline:
                return heads
            time.sleep(COMMIT_POLL)
