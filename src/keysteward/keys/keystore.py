"""Tenant keys (KEKs) and their versions: create, rotate, disable, destroy. The data keys stored under them
are :class:`keysteward.keys.data_keys.DataKeys` (``KeyStore.data``).

Every mutation writes its audit record in the same transaction. Key material leaves this
module only as wrapped bytes, except through :meth:`KeyStore.kek`, which the envelope
operations and the (future) release service use.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from keysteward.audit.log import AuditLog
from keysteward.crypto import aead
from keysteward.crypto.aead import AeadKey
from keysteward.errors import BadRequest, Conflict, NotFound
from keysteward.identity.principal import Principal, check_name
from keysteward.keys.data_keys import DataKeys
from keysteward.keys.model import KeyInfo, KeyRef, VersionInfo
from keysteward.keys.root import RootOfTrust
from keysteward.keys.wrapping import KekCache, kek_aad
from keysteward.store.db import Database, checkpoint, for_update
from keysteward.store.models import DataKey, Key, KeyVersion, RotationJob
from keysteward.ttlcache import TtlCache

ENABLED, DISABLED, DESTROYED = "enabled", "disabled", "destroyed"


STATE_TTL_SECONDS = 1.0  # how long another server's disable/rotate/destroy may take to reach this one

ShredHook = Callable[[Connection, str, str, int | None, str], int]
"""Called inside a key (version) destroy's transaction with (conn, tenant id, key id, the version or None for
the whole key, the actor); destroys what lived under it (volumes) with its own audit records, returns how many."""


# built once: constructing a statement and walking it for its cache key cost more than the read
_KEY_BY_NAME = select(Key.__table__).where(Key.tenant_id == bindparam("t"), Key.name == bindparam("n"))
_VERSION = select(KeyVersion.state, KeyVersion.wrapped).where(
    KeyVersion.key_id == bindparam("k"), KeyVersion.version == bindparam("v")
)


class KeyStore:
    def __init__(self, db: Database, root: RootOfTrust, audit: AuditLog) -> None:
        self.db = db
        self.root = root
        self.audit = audit
        self.cache = KekCache()
        # key rows and live versions seen recently, so envelope operations need no database read;
        # changes made here drop them at once, changes made by another server within STATE_TTL_SECONDS
        # (both read ahead while in use: see keysteward.ttlcache)
        self._refs: TtlCache[tuple[str, str], KeyRef] = TtlCache(STATE_TTL_SECONDS, load=self._read_ref)
        self._live_versions: TtlCache[tuple[str, int], bool] = TtlCache(STATE_TTL_SECONDS, load=self._read_live)
        self.on_shred: list[ShredHook] = []
        self.data = DataKeys(self)
        """The data keys stored under these keys (:mod:`keysteward.keys.data_keys`)."""
        root.on_seal(self.cache.clear)
        root.on_seal(self._forget_all)

    def _forget_all(self) -> None:
        self._refs.clear()
        self._live_versions.clear()

    def _forget(self, key_id: str) -> None:
        self._refs.drop_where(lambda _key, ref: ref.id == key_id)
        self._live_versions.drop_where(lambda live, _ok: live[0] == key_id)

    def key_ref(self, tenant_id: str, *, name: str | None = None, key_id: str | None = None) -> KeyRef | None:
        """The key's id, state and primary version, from a short-lived cache or the database."""
        cache_key = (tenant_id, f"name:{name}" if name is not None else f"id:{key_id}")
        hit = self._refs.get(cache_key)
        if hit is not None:
            return hit
        ref = self._read_ref(cache_key)
        if ref is not None:
            self._refs.put(cache_key, ref)
        return ref

    def _read_ref(self, cache_key: tuple[str, str]) -> KeyRef | None:
        tenant_id, which = cache_key
        kind, _, value = which.partition(":")
        with self.db.read() as conn:
            stmt = select(Key.id, Key.name, Key.state, Key.primary_version).where(Key.tenant_id == tenant_id)
            stmt = stmt.where(Key.name == value) if kind == "name" else stmt.where(Key.id == value)
            row = conn.execute(stmt).first()
        return None if row is None else KeyRef(row.id, row.name, row.state, row.primary_version)

    def _read_live(self, live: tuple[str, int]) -> bool | None:
        """True while the version is usable, else None; a destroyed version's KEK leaves the cache at once."""
        key_id, version = live
        with self.db.read() as conn:
            row = conn.execute(_VERSION, {"k": key_id, "v": version}).first()
        if row is None or row.state == DESTROYED or row.wrapped is None:
            self.cache.evict(key_id, version)
            return None
        return True

    def is_warm(
        self, tenant_id: str, *, name: str | None = None, key_id: str | None = None, version: int | None = None
    ) -> bool:
        """Whether :meth:`key_ref` and :meth:`usable_kek` would answer from memory right now."""
        ref = self._refs.get((tenant_id, f"name:{name}" if name is not None else f"id:{key_id}"))
        if ref is None:
            return False
        version = ref.primary_version if version is None else version
        return self.cache.get(ref.id, version) is not None and self._live_versions.get((ref.id, version)) is not None

    def usable_kek(self, tenant_id: str, key_id: str, version: int) -> AeadKey:
        """The KEK version for an envelope operation; checks its state at most once per TTL."""
        cached = self.cache.get(key_id, version)
        if cached is not None and self._live_versions.get((key_id, version)) is not None:
            return cached
        with self.db.read() as conn:
            kek = self.kek(conn, tenant_id, key_id, version)
        self._live_versions.put((key_id, version), True)
        return kek

    # -- reading -----------------------------------------------------------------------------
    def key_row(self, conn: Connection, tenant_id: str, name: str, *, lock: bool = False) -> Key:
        stmt = for_update(_KEY_BY_NAME, self.db) if lock else _KEY_BY_NAME
        row = conn.execute(stmt, {"t": tenant_id, "n": name}).first()
        if row is None:
            raise NotFound(f"no key '{name}'", code="key_not_found")
        return row  # type: ignore[return-value]

    def key_by_id(self, conn: Connection, tenant_id: str, key_id: str) -> Key | None:
        row = conn.execute(select(Key.__table__).where(Key.tenant_id == tenant_id, Key.id == key_id)).first()
        return row  # type: ignore[return-value]

    def _info(self, conn: Connection, row: Key, *, versions: bool) -> KeyInfo:
        vinfo: list[VersionInfo] = []
        rotation = None
        if versions:
            counts = dict(
                conn.execute(
                    select(DataKey.kek_version, func.count())
                    .where(DataKey.key_id == row.id, DataKey.wrapped.is_not(None))
                    .group_by(DataKey.kek_version)
                ).all()
            )
            for v in conn.execute(
                select(KeyVersion.version, KeyVersion.state, KeyVersion.created_at, KeyVersion.destroyed_at)
                .where(KeyVersion.key_id == row.id)
                .order_by(KeyVersion.version)
            ):
                vinfo.append(
                    VersionInfo(v.version, v.state, v.created_at, v.destroyed_at, int(counts.get(v.version, 0)))
                )
            job = conn.execute(
                select(RotationJob.id, RotationJob.state, RotationJob.target_version, RotationJob.rewrapped)
                .where(RotationJob.key_id == row.id)
                .order_by(RotationJob.created_at.desc())
                .limit(1)
            ).first()
            if job is not None:
                rotation = {
                    "job": job.id,
                    "state": job.state,
                    "target_version": job.target_version,
                    "rewrapped": job.rewrapped,
                }
        return KeyInfo(
            row.id, row.name, row.description, row.state, row.primary_version, row.created_at, vinfo, rotation
        )

    def list_keys(self, actor: Principal) -> list[KeyInfo]:
        with self.db.read() as conn:
            rows = conn.execute(select(Key.__table__).where(Key.tenant_id == actor.tenant_id).order_by(Key.name)).all()
            return [self._info(conn, r, versions=False) for r in rows]  # type: ignore[arg-type]

    def describe(self, actor: Principal, name: str) -> KeyInfo:
        with self.db.read() as conn:
            return self._info(conn, self.key_row(conn, actor.tenant_id, name), versions=True)

    # -- KEK material ------------------------------------------------------------------------
    def _new_version(self, conn: Connection, tenant_id: str, key_id: str, version: int) -> None:
        material = aead.random_key()
        wrapped = self.root.root().seal(material, kek_aad(tenant_id, key_id, version))
        material[:] = bytes(len(material))
        conn.execute(
            insert(KeyVersion).values(
                key_id=key_id, version=version, state=ENABLED, wrapped=wrapped, created_at=datetime.now(UTC)
            )
        )

    def kek(self, conn: Connection, tenant_id: str, key_id: str, version: int) -> AeadKey:
        """The usable KEK version, or an error naming why not (destroyed, unknown)."""
        row = conn.execute(_VERSION, {"k": key_id, "v": version}).first()
        state, wrapped = (None, None) if row is None else (row.state, row.wrapped)
        return self.open_kek(tenant_id, key_id, version, state, wrapped)

    def open_kek(self, tenant_id: str, key_id: str, version: int, state: str | None, wrapped: bytes | None) -> AeadKey:
        """:meth:`kek` of a version read by the caller (``state`` None: there is no such version)."""
        if state is None:
            raise NotFound(f"key version {version} does not exist", code="key_version_not_found")
        if state == DESTROYED or wrapped is None:
            self.cache.evict(key_id, version)
            raise Conflict(
                f"key version {version} was destroyed; data under it is unrecoverable",
                code="key_version_destroyed",
            )
        cached = self.cache.get(key_id, version)
        if cached is not None:
            return cached
        material = self.root.root().open(wrapped, kek_aad(tenant_id, key_id, version))
        return self.cache.put(key_id, version, material)

    @staticmethod
    def require_enabled(row: Key | KeyRef) -> None:
        if row.state == DISABLED:
            raise Conflict(f"key '{row.name}' is disabled", code="key_disabled")
        if row.state == DESTROYED:
            raise Conflict(f"key '{row.name}' was destroyed", code="key_destroyed")

    # -- lifecycle ---------------------------------------------------------------------------
    def create(self, actor: Principal, name: str, description: str = "") -> KeyInfo:
        check_name("key", name)
        if len(description) > 1024:
            raise BadRequest("description is longer than 1024 characters", code="bad_description")
        self.root.root()
        try:
            with self.db.write() as conn:
                self.create_in(conn, actor, name, description)
                return self._info(conn, self.key_row(conn, actor.tenant_id, name), versions=True)
        except IntegrityError as exc:
            raise Conflict(f"a key named '{name}' exists already", code="key_exists") from exc

    def create_in(self, conn: Connection, actor: Principal, name: str, description: str = "") -> str:
        """:meth:`create` in the caller's write transaction (IntegrityError if the name is taken); its id."""
        key_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        conn.execute(
            insert(Key).values(
                id=key_id, tenant_id=actor.tenant_id, name=name, description=description, state=ENABLED,
                primary_version=1, created_at=now, updated_at=now,
            )
        )  # fmt: skip
        self._new_version(conn, actor.tenant_id, key_id, 1)
        self.audit.append(conn, actor.tenant_id, actor=actor.describe(), action="key.create", target=f"key:{name}",
                          details={"key_id": key_id, "version": 1})  # fmt: skip
        return key_id

    def rotate(self, actor: Principal, name: str) -> KeyInfo:
        """New primary version; a rewrap job moves the stored DEKs to it in the background."""
        self.root.root()
        with self.db.write() as conn:
            row = self.key_row(conn, actor.tenant_id, name, lock=True)
            self.require_enabled(row)
            latest = conn.execute(select(func.max(KeyVersion.version)).where(KeyVersion.key_id == row.id)).scalar_one()
            version = int(latest) + 1
            self._new_version(conn, actor.tenant_id, row.id, version)
            conn.execute(
                update(Key).where(Key.id == row.id).values(primary_version=version, updated_at=datetime.now(UTC))
            )
            conn.execute(
                update(RotationJob)
                .where(RotationJob.key_id == row.id, RotationJob.state == "running")
                .values(state="superseded", finished_at=datetime.now(UTC))
            )
            job_id = str(uuid.uuid4())
            conn.execute(
                insert(RotationJob).values(
                    id=job_id,
                    tenant_id=actor.tenant_id,
                    key_id=row.id,
                    target_version=version,
                    state="running",
                    rewrapped=0,
                    created_at=datetime.now(UTC),
                )
            )
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="key.rotate",
                target=f"key:{name}",
                details={"version": version, "rewrap_job": job_id},
            )
            info = self._info(conn, self.key_row(conn, actor.tenant_id, name), versions=True)
        self._forget(row.id)
        return info

    def set_enabled(self, actor: Principal, name: str, enabled: bool) -> KeyInfo:
        with self.db.write() as conn:
            row = self.key_row(conn, actor.tenant_id, name, lock=True)
            if row.state == DESTROYED:
                raise Conflict(f"key '{name}' was destroyed", code="key_destroyed")
            state = ENABLED if enabled else DISABLED
            conn.execute(update(Key).where(Key.id == row.id).values(state=state, updated_at=datetime.now(UTC)))
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="key.enable" if enabled else "key.disable",
                target=f"key:{name}",
            )
            info = self._info(conn, self.key_row(conn, actor.tenant_id, name), versions=True)
        self._forget(row.id)
        return info

    def destroy_version(self, actor: Principal, name: str, version: int, *, force: bool = False) -> KeyInfo:
        """Crypto-shred one version: its material and the DEKs wrapped under it are gone for good."""
        with self.db.write() as conn:
            row = self.key_row(conn, actor.tenant_id, name, lock=True)
            vrow = conn.execute(
                select(KeyVersion.state).where(KeyVersion.key_id == row.id, KeyVersion.version == version)
            ).first()
            if vrow is None:
                raise NotFound(f"key '{name}' has no version {version}", code="key_version_not_found")
            if vrow.state == DESTROYED:
                raise Conflict(f"version {version} of '{name}' is destroyed already", code="key_version_destroyed")
            if version == row.primary_version and row.state != DESTROYED:
                raise Conflict(
                    f"version {version} is the primary version of '{name}': rotate first, or destroy the whole key",
                    code="destroy_primary_version",
                )
            deks = self._shred(conn, actor, row, version, force=force)
            volumes = self._shred_dependents(conn, actor, row.id, version)
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="key.version.destroy",
                target=f"key:{name}",
                details={"version": version, "data_keys_shredded": deks, "volumes_destroyed": volumes},
            )
        self._after_shred(row.id, version)
        return self.describe(actor, name)

    def destroy(self, actor: Principal, name: str) -> KeyInfo:
        """Crypto-shred the whole key: every version and every DEK under it."""
        with self.db.write() as conn:
            row = self.key_row(conn, actor.tenant_id, name, lock=True)
            versions = [
                v
                for (v,) in conn.execute(
                    select(KeyVersion.version).where(KeyVersion.key_id == row.id, KeyVersion.state != DESTROYED)
                )
            ]
            deks = sum(self._shred(conn, actor, row, v, force=True) for v in versions)
            volumes = self._shred_dependents(conn, actor, row.id, None)
            conn.execute(update(Key).where(Key.id == row.id).values(state=DESTROYED, updated_at=datetime.now(UTC)))
            conn.execute(
                update(RotationJob)
                .where(RotationJob.key_id == row.id, RotationJob.state == "running")
                .values(state="cancelled", finished_at=datetime.now(UTC))
            )
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="key.destroy",
                target=f"key:{name}",
                details={"versions": versions, "data_keys_shredded": deks, "volumes_destroyed": volumes},
            )
        self._after_shred(row.id, None)
        return self.describe(actor, name)

    def _shred(self, conn: Connection, actor: Principal, row: Key, version: int, *, force: bool) -> int:
        live = conn.execute(
            select(func.count())
            .select_from(DataKey)
            .where(DataKey.key_id == row.id, DataKey.kek_version == version, DataKey.wrapped.is_not(None))
        ).scalar_one()
        if live and not force:
            raise Conflict(
                f"{live} stored data key(s) are still wrapped under version {version} (rewrap not finished); "
                "destroying it shreds them: pass force to do so",
                code="version_in_use",
            )
        conn.execute(
            update(DataKey).where(DataKey.key_id == row.id, DataKey.kek_version == version).values(wrapped=None)
        )
        conn.execute(
            update(KeyVersion)
            .where(KeyVersion.key_id == row.id, KeyVersion.version == version)
            .values(state=DESTROYED, wrapped=None, destroyed_at=datetime.now(UTC))
        )
        return int(live)

    def _shred_dependents(self, conn: Connection, actor: Principal, key_id: str, version: int | None) -> int:
        """Destroy, in this transaction, what held a data key under the key (version): see :data:`ShredHook`."""
        return sum(hook(conn, actor.tenant_id, key_id, version, actor.describe()) for hook in self.on_shred)

    def _after_shred(self, key_id: str, version: int | None) -> None:
        self._forget(key_id)
        self.cache.evict(key_id, version)
        checkpoint(self.db)
