"""A steady load of releases and renewals through the agent's multi-URL client, for the HA fault tests and
bench/failover.py: what was answered, what failed, and when.

Each volume has its own instance (a devcloud identity document is its evidence); the load releases the
volumes in turn and, between releases, renews the lease it got last time for another volume. A release
answered is recorded with its lease id (the tests then find that lease and its audit record); a failure is
recorded with its code and time. The same instance asking again supersedes its own lease, so a release
retried on another server never looks like a clone.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from keysteward.agent.client import AgentClient
from keysteward.agent.release_answers import Lease, Released
from keysteward.devcloud.provider import DevCloud, Instance
from keysteward.errors import KeystewardError


@dataclass(frozen=True)
class Answered:
    started: float
    at: float
    kind: str  # "release" or "renew"
    volume_id: str
    lease_id: str
    action: str = ""


@dataclass(frozen=True)
class Failed:
    at: float
    kind: str
    code: str
    message: str


@dataclass
class ReleaseLoad:
    urls: Sequence[str]
    ca_file: str
    tenant: str
    cloud: DevCloud
    volumes: list[tuple[str, Instance]]
    pause: float = 0.0
    answered: list[Answered] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def evidence(self, instance: Instance) -> object:
        def make(bound: bytes) -> dict[str, str]:
            document, signature = self.cloud.aws_document(instance, bound.hex())
            return {
                "type": "aws-iid",
                "document": base64.b64encode(document).decode(),
                "signature": base64.b64encode(signature).decode(),
            }

        return make

    def start(self) -> ReleaseLoad:
        self._thread = threading.Thread(target=self._run, name="ha-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        held: dict[str, Lease] = {}
        with AgentClient(list(self.urls), ca_file=self.ca_file, timeout=15) as client:
            n = 0
            while not self._stop.is_set():
                volume_id, instance = self.volumes[n % len(self.volumes)]
                n += 1
                started = time.monotonic()
                try:
                    got = client.release(self.tenant, volume_id, self.evidence(instance))  # type: ignore[arg-type]
                    assert isinstance(got, Released)
                    self.answered.append(Answered(started, time.monotonic(), "release", volume_id, got.lease.id))
                    got.secret.wipe()
                    old = held.pop(volume_id, None)
                    if old is not None:
                        old.wipe()
                    held[volume_id] = got.lease
                except KeystewardError as exc:
                    self.failed.append(Failed(time.monotonic(), "release", exc.code, exc.message[:200]))
                    # a 503 may hide a release committed locally (docs/ha.md) that superseded the lease we
                    # hold: its renewal would answer "expired". Like a careful agent, forget it and ask again.
                    stale = held.pop(volume_id, None)
                    if stale is not None:
                        stale.wipe()
                other = self.volumes[n % len(self.volumes)][0]
                lease = held.get(other)
                if lease is not None:
                    started = time.monotonic()
                    try:
                        renewal = client.renew(lease)
                        self.answered.append(
                            Answered(started, time.monotonic(), "renew", other, lease.id, renewal.action)
                        )
                    except KeystewardError as exc:
                        self.failed.append(Failed(time.monotonic(), "renew", exc.code, exc.message[:200]))
                if self.pause:
                    self._stop.wait(self.pause)
        for lease in held.values():
            lease.wipe()

    # -- what happened -----------------------------------------------------------------------------

    def releases(self) -> list[Answered]:
        return [a for a in list(self.answered) if a.kind == "release"]

    def first_release_after(self, t0: float) -> float | None:
        """Seconds from ``t0`` to the first answer of a release asked after it (None: none yet)."""
        later = [a.at for a in self.releases() if a.started > t0]
        return min(later) - t0 if later else None

    def wait_release_after(self, t0: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.first_release_after(t0)
            if found is not None:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no release answered within {timeout} s; failures: {self.failed[-5:]}")
