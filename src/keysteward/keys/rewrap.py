"""Background rewrap of stored DEKs after a KEK rotation: resumable and safe across servers.

A job is leased to one server at a time (``owner`` + ``lease_until``). Each batch unwraps DEKs
under their old version and wraps them under the job's target version in one transaction that
also advances the job, so a server killed mid-job leaves every DEK unwrappable (old versions
stay until destroyed) and the next server that takes the lease carries on where it stopped.
"""

from __future__ import annotations

import logging
import secrets
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update

from keysteward.errors import KeystewardError
from keysteward.keys.keystore import KeyStore
from keysteward.keys.wrapping import dek_aad
from keysteward.settings import RewrapSettings
from keysteward.store.models import DataKey, Key, KeyVersion, RotationJob

log = logging.getLogger("keysteward.rewrap")
KEK_MAX_AGE_SECONDS = 60.0  # a version destroyed on another server leaves this one's memory within this


class Rewrapper:
    def __init__(self, keys: KeyStore, settings: RewrapSettings) -> None:
        self.keys = keys
        self.db = keys.db
        self.settings = settings
        self.owner = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="keysteward-rewrap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.keys.cache.sweep(KEK_MAX_AGE_SECONDS)
            try:
                worked = self.run_once()
            except KeystewardError as exc:
                log.warning("rewrap paused: %s", exc.diagnostics())
                worked = False
            except Exception:
                log.exception("rewrap failed; retrying")
                worked = False
            if not worked:
                self._stop.wait(self.settings.poll_seconds)

    def _claim(self) -> RotationJob | None:
        now = datetime.now(UTC)
        with self.db.write() as conn:
            job = conn.execute(
                select(RotationJob.__table__)
                .where(
                    RotationJob.state == "running",
                    or_(
                        RotationJob.owner.is_(None),
                        RotationJob.owner == self.owner,
                        RotationJob.lease_until < now,
                    ),
                )
                .order_by(RotationJob.created_at)
                .limit(1)
            ).first()
            if job is None:
                return None
            claimed = conn.execute(
                update(RotationJob)
                .where(
                    RotationJob.id == job.id,
                    RotationJob.state == "running",
                    or_(
                        RotationJob.owner.is_(None),
                        RotationJob.owner == self.owner,
                        RotationJob.lease_until < now,
                    ),
                )
                .values(owner=self.owner, lease_until=now + timedelta(seconds=self.settings.lease_seconds))
            )
            return job if claimed.rowcount == 1 else None  # type: ignore[return-value]

    def run_once(self) -> bool:
        """Process one batch of one job; False when there was nothing to do."""
        if self.keys.root.sealed:
            return False
        job = self._claim()
        if job is None:
            return False
        with self.db.write() as conn:
            current = conn.execute(select(RotationJob.state, RotationJob.owner).where(RotationJob.id == job.id)).one()
            if current.state != "running" or current.owner != self.owner:
                return True
            destroyed = select(KeyVersion.version).where(
                KeyVersion.key_id == job.key_id, KeyVersion.state == "destroyed"
            )
            batch = conn.execute(
                select(DataKey.id, DataKey.kek_version, DataKey.wrapped)
                .where(
                    DataKey.key_id == job.key_id,
                    DataKey.kek_version != job.target_version,
                    DataKey.wrapped.is_not(None),
                    DataKey.kek_version.not_in(destroyed),
                )
                .order_by(DataKey.id)
                .limit(self.settings.batch_size)
            ).all()
            now = datetime.now(UTC)
            if not batch:
                conn.execute(
                    update(RotationJob)
                    .where(RotationJob.id == job.id)
                    .values(state="done", finished_at=now, owner=None, lease_until=None)
                )
                key_name = conn.execute(select(Key.name).where(Key.id == job.key_id)).scalar_one()
                self.keys.audit.append(
                    conn,
                    job.tenant_id,
                    actor=f"server:{self.owner}",
                    action="key.rewrap.done",
                    target=f"key:{key_name}",
                    details={"version": job.target_version, "rewrapped": job.rewrapped},
                )
                return True
            target = self.keys.kek(conn, job.tenant_id, job.key_id, job.target_version)
            moved = 0
            for dek in batch:
                old = self.keys.kek(conn, job.tenant_id, job.key_id, dek.kek_version)
                plain = old.open(dek.wrapped, dek_aad(job.tenant_id, job.key_id, dek.kek_version, dek.id))
                try:
                    wrapped = target.seal(plain, dek_aad(job.tenant_id, job.key_id, job.target_version, dek.id))
                finally:
                    plain[:] = bytes(len(plain))
                result = conn.execute(
                    update(DataKey)
                    .where(DataKey.id == dek.id, DataKey.kek_version == dek.kek_version)
                    .values(wrapped=wrapped, kek_version=job.target_version)
                )
                moved += result.rowcount
            conn.execute(
                update(RotationJob)
                .where(RotationJob.id == job.id)
                .values(
                    rewrapped=RotationJob.rewrapped + moved,
                    lease_until=now + timedelta(seconds=self.settings.lease_seconds),
                )
            )
        if self.settings.interval:
            self._stop.wait(self.settings.interval)
        return True
