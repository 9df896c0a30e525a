"""``keysteward agent run``: keep the configured volumes open while their leases live.

For each volume of the config (:mod:`keysteward.agent.config`) the agent unlocks it
(:func:`~keysteward.agent.unlock.unlock`) and renews its lease every ``renew_seconds``. A renewal answers:

- ``continue``: the lease runs to its new expiry;
- ``revoked``: the volume is locked and its key wiped; no new release is asked for;
- ``shred``: as revoked, and the ``keysteward`` keyslot and token leave the header;
- ``expired`` or ``lease_not_found``: locked and wiped, then a new release with fresh evidence.

When the key manager cannot be reached the volume stays open for its grace (:func:`lock_deadline`:
``None`` until the lease expires, ``0`` not past the first failed renewal, ``N`` seconds past the
last successful renewal, never past the expiry), then it is locked and the agent keeps asking for a
new release. SIGTERM/SIGINT lock every volume and end the leases cleanly.

The status file (JSON, replaced atomically) says per volume: state (``open``, ``locked``,
``shredded``), why, the lease's expiry, the last action. Never key bytes. Log lines are
``event=... volume=... key=value`` records.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keysteward.agent.config import VolumeEntry
from keysteward.agent.process import harden_process, logline, sd_notify, write_status
from keysteward.agent.release_answers import Lease
from keysteward.agent.unlock import Unlocked, unlock
from keysteward.errors import KeystewardError, NotFound, Unavailable
from keysteward.volume.kms_token import shred

log = logging.getLogger("keysteward.agent")

DEFAULT_STATUS_FILE = "/run/keysteward/agent.json"
RETRY_MIN = 1.0
RETRY_MAX = 60.0
UNREACHABLE_RETRY = 5.0
"""Seconds between renewal attempts while the key manager is unreachable (at most; renew_seconds if lower)."""
USE_FAILED_RETRY = 30.0
"""Seconds before a volume that was released but could not be used (``on_unlock`` raised) is tried again."""


def lock_deadline(*, expires: float, last_success: float, failing_since: float | None, grace: float | None) -> float:
    """When to lock a volume whose renewals fail (all on one clock). While renewals succeed
    (``failing_since`` None) that is the lease's expiry; then ``grace`` decides (see the module doc)."""
    if failing_since is None or grace is None:
        return expires
    if grace <= 0:
        return min(failing_since, expires)
    return min(last_success + grace, expires)


def effective_grace(server: float | None, local: float | None) -> float | None:
    """The stricter of the key manager's grace and the config's cap (None = until expiry)."""
    if server is None:
        return local
    if local is None:
        return server
    return min(server, local)


@dataclass
class Tracked:
    """One configured volume and what the agent knows about it."""

    entry: VolumeEntry
    unlocked: Unlocked | None = None
    state: str = "locked"
    reason: str = "starting"
    expires: float = 0.0
    """Lease expiry, monotonic clock."""
    expires_at: str | None = None
    next_renew: float = 0.0
    last_success: float = 0.0
    last_renewal_at: str | None = None
    failing_since: float | None = None
    retry_at: float | None = 0.0
    failures: int = 0
    last_action: str | None = None
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    def grace(self) -> float | None:
        server = self.unlocked.lease.grace_seconds if self.unlocked is not None else None
        return effective_grace(server, self.entry.grace_seconds)

    def deadline(self) -> float:
        return lock_deadline(expires=self.expires, last_success=self.last_success,
                             failing_since=self.failing_since, grace=self.grace())  # fmt: skip

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.entry.path, "state": self.state, "reason": self.reason, "last_action": self.last_action,
            "last_error": self.last_error, "lease_expires_at": self.expires_at if self.state == "open" else None,
            "last_renewal_at": self.last_renewal_at,
        }  # fmt: skip
        if self.unlocked is not None:
            out |= {"mode": self.unlocked.mode, "volume_id": self.unlocked.token.ref.volume_id,
                    "lease_id": self.unlocked.lease.id, "keyslot": self.unlocked.token.keyslot,
                    "grace_seconds": self.grace()}  # fmt: skip
        return out


UnlockHook = Callable[[Tracked], None]
LockHook = Callable[[Tracked, str], None]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _expiry_mono(lease_expires: datetime) -> float:
    return time.monotonic() + (lease_expires - datetime.now(UTC)).total_seconds()


class Agent:
    """The daemon's state machine over its volumes; :meth:`run` loops until :meth:`stop`."""

    def __init__(
        self,
        entries: list[VolumeEntry],
        status_file: str,
        *,
        config: str = "",
        on_unlock: UnlockHook | None = None,
        before_lock: LockHook | None = None,
    ) -> None:
        """``status_file`` "" writes none. ``on_unlock(v)`` runs when a volume has opened (raising: the volume
        cannot be used, so its lease ends and it locks again, retried later); ``before_lock(v, reason)`` runs
        before a volume's key is wiped (the NBD proxy drops the export and its connections there)."""
        self.volumes = [Tracked(entry) for entry in entries]
        self.status_file = status_file
        self.config = config
        self.started_at = _now_iso()
        self._stop = threading.Event()
        self._on_unlock = on_unlock
        self._before_lock = before_lock

    # -- public -----------------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.stop)
        self.step()
        sd_notify("READY=1")
        while not self._stop.is_set():
            self._stop.wait(self._sleep())
            if not self._stop.is_set():
                self.step()
        self.shutdown()

    def step(self) -> None:
        """Everything due now: unlocks, renewals, locks at deadlines; then the status file."""
        for volume in self.volumes:
            self._step(volume, time.monotonic())
        self.write_status()

    def shutdown(self) -> None:
        """Lock every open volume and end its lease (clean detach)."""
        sd_notify("STOPPING=1")
        for volume in self.volumes:
            if volume.unlocked is not None:
                self._end_lease(volume)
                self._lock(volume, "stopped", action="stop")
        self.write_status()

    def status(self) -> dict[str, Any]:
        return {
            "agent": {"pid": os.getpid(), "started_at": self.started_at, "updated_at": _now_iso(),
                      "config": self.config},
            "volumes": {v.name: v.status() for v in self.volumes},
        }  # fmt: skip

    def track(self, entry: VolumeEntry) -> None:
        """Keep one more volume; it is released at the next :meth:`step`."""
        self.volumes.append(Tracked(entry, retry_at=time.monotonic()))

    def forget(self, name: str, reason: str) -> None:
        """Stop keeping ``name``: end its lease cleanly, wipe its key, drop it."""
        for v in list(self.volumes):
            if v.name == name:
                self._end_lease(v)
                self._lock(v, reason, action=reason)
                self.volumes.remove(v)

    def next_due(self) -> float:
        """Seconds until something is due (a renewal, a lock at a deadline, a retry)."""
        return self._sleep()

    def write_status(self) -> None:
        if not self.status_file:
            return
        try:
            write_status(self.status_file, self.status())
        except OSError as exc:
            log.error(logline("status_write_failed", file=self.status_file, error=exc.strerror))

    # -- the state machine -------------------------------------------------------------------------

    def _sleep(self) -> float:
        now = time.monotonic()
        due = [RETRY_MAX]
        for v in self.volumes:
            if v.unlocked is not None:
                due += [v.next_renew - now, v.deadline() - now]
            elif v.retry_at is not None:
                due.append(v.retry_at - now)
        return max(0.05, min(due))

    def _step(self, v: Tracked, now: float) -> None:
        if v.unlocked is None:
            if v.retry_at is not None and now >= v.retry_at:
                self._unlock(v)
            return
        if now >= v.deadline():
            reason = "lease_expired" if v.failing_since is None else "kms_unreachable"
            self._lock(v, reason, action="lock")
            v.retry_at = now + RETRY_MIN
            return
        if now >= v.next_renew:
            self._renew(v, now)

    def _unlock(self, v: Tracked) -> None:
        try:
            unlocked = unlock(v.entry.path, v.entry.options)
        except KeystewardError as exc:
            v.failures += 1
            v.retry_at = time.monotonic() + min(RETRY_MAX, RETRY_MIN * 2 ** min(v.failures, 6))
            v.last_error, v.last_action = exc.code, "unlock_failed"
            log.warning(logline("unlock_failed", volume=v.name, code=exc.code, error=exc.message,
                                retry_in=round(v.retry_at - time.monotonic(), 1)))  # fmt: skip
            return
        now = time.monotonic()
        v.unlocked, v.state, v.reason = unlocked, "open", "released"
        v.failures, v.retry_at, v.failing_since, v.last_error = 0, None, None, None
        self._leased(v, unlocked.lease, now)
        v.last_action = "unlock"
        log.info(logline("unlocked", volume=v.name, path=v.entry.path, mode=unlocked.mode,
                         lease=unlocked.lease.id, expires_at=v.expires_at))  # fmt: skip
        if self._on_unlock is None:
            return
        try:
            self._on_unlock(v)
        except Exception as exc:  # noqa: BLE001 - a volume that cannot be used must not stay unlocked
            code = exc.code if isinstance(exc, KeystewardError) else "open_failed"
            log.error(logline("use_failed", volume=v.name, code=code, error=type(exc).__name__))
            self._end_lease(v)
            self._lock(v, code, action="open_failed")
            v.retry_at = time.monotonic() + USE_FAILED_RETRY

    def _leased(self, v: Tracked, lease: Lease, now: float) -> None:
        v.expires = _expiry_mono(lease.expires_at)
        v.expires_at = lease.expires_at.isoformat()
        v.last_success = now
        v.last_renewal_at = _now_iso()
        v.next_renew = now + max(0.2, lease.renew_seconds)

    def _renew(self, v: Tracked, now: float) -> None:
        assert v.unlocked is not None
        lease = v.unlocked.lease
        try:
            with v.entry.options.client(v.unlocked.url) as c:
                renewal = c.renew(lease)
        except NotFound as exc:  # lease_not_found: the key manager no longer knows this lease
            self._lock(v, exc.code, action="lease_lost")
            v.retry_at = time.monotonic()
            return
        except KeystewardError as exc:
            if not isinstance(exc, Unavailable) and exc.status < 500 and exc.code != "kms_protocol":
                self._lock(v, exc.code, action="renew_refused")  # a definite refusal (401, 403...)
                v.retry_at = time.monotonic() + RETRY_MAX
                return
            v.failing_since = v.failing_since if v.failing_since is not None else now
            v.next_renew = now + min(UNREACHABLE_RETRY, max(0.2, lease.renew_seconds))
            v.last_error, v.last_action = exc.code, "renew_failed"
            log.warning(logline("renew_failed", volume=v.name, code=exc.code, grace=v.grace(),
                                lock_in=round(v.deadline() - now, 1)))  # fmt: skip
            if time.monotonic() >= v.deadline():
                self._lock(v, "kms_unreachable", action="lock")
                v.retry_at = time.monotonic() + RETRY_MIN
            return
        v.failing_since, v.last_error = None, None
        if renewal.action == "continue":
            if renewal.expires_at is not None:
                lease.expires_at = renewal.expires_at
            self._leased(v, lease, now)
            v.last_action = "renew"
            log.debug(logline("renewed", volume=v.name, expires_at=v.expires_at))
        elif renewal.action == "revoked":
            self._lock(v, "revoked", action="revoked")
            v.retry_at = None
        elif renewal.action == "shred":
            self._lock(v, "shred", action="shred")
            v.retry_at = None
            self._shred(v)
        else:  # expired: ask again with fresh evidence
            self._lock(v, "lease_expired", action="expired")
            v.retry_at = time.monotonic()

    def _lock(self, v: Tracked, reason: str, *, action: str) -> None:
        unlocked, v.unlocked = v.unlocked, None
        v.state, v.reason, v.last_action = "locked", reason, action
        if unlocked is None:
            return
        if self._before_lock is not None:
            try:
                self._before_lock(v, reason)
            except Exception as exc:  # noqa: BLE001 - whatever the hook did, the key is wiped below
                log.error(logline("before_lock_failed", volume=v.name, reason=reason, error=type(exc).__name__))
        try:
            unlocked.close()  # wipes the volume key (userspace) or has the kernel drop it (dm); wipes the lease
        except KeystewardError as exc:
            v.last_error = exc.code
            log.error(logline("lock_failed", volume=v.name, code=exc.code, error=exc.message))
        log.warning(logline("locked", volume=v.name, reason=reason, action=action))

    def _shred(self, v: Tracked) -> None:
        try:
            done = shred(v.entry.path)
        except KeystewardError as exc:
            v.last_error = exc.code
            log.error(logline("shred_failed", volume=v.name, code=exc.code, error=exc.message))
            return
        v.state = "shredded"
        log.warning(logline("shredded", volume=v.name, keyslot=done.keyslot, token=done.token,
                            openable=done.openable))  # fmt: skip

    def _end_lease(self, v: Tracked) -> None:
        unlocked = v.unlocked
        if unlocked is None:
            return
        try:
            with v.entry.options.client(unlocked.url, timeout=5.0) as client:
                client.end(unlocked.lease)
        except KeystewardError as exc:
            log.warning(logline("end_failed", volume=v.name, lease=unlocked.lease.id, code=exc.code))


def run_agent(entries: list[VolumeEntry], status_file: str, *, config: str = "") -> Agent:
    """Harden the process and run the agent until SIGTERM/SIGINT."""
    harden_process()
    agent = Agent(entries, status_file, config=config)
    agent.run()
    return agent
