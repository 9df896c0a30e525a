"""What the release path decides over: trusted providers, registered volumes, revocations (the types of a
volume, its binding and its callers are :mod:`keysteward.release.volumes`).

Every change here is written with its audit record in one transaction. A volume's keyslot secret is a
stored data key (see :mod:`keysteward.keys.keystore`); registering a volume hands the new secret back once
in a locked buffer, for the caller to seal to the creating tool.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from keysteward.attest.providers import ProviderTrust
from keysteward.audit.log import AuditLog
from keysteward.errors import BadRequest, Conflict, NotFound
from keysteward.identity.principal import Principal, check_name
from keysteward.keys.cert_revocations import revoke_host_certs
from keysteward.keys.keystore import KeyStore
from keysteward.release import leases
from keysteward.release.volumes import (
    ACTIVE,
    DESTROYED,
    REVOKED,
    SECRET_SIZE,
    SHRED,
    VM,
    VOLUME,
    VolumeInfo,
    VolumeSpec,
    actor_of,
    volume_info,
)
from keysteward.store.db import Database, for_update
from keysteward.store.models import DataKey, Key, Lease, Provider, RevokedInstance, Volume
from keysteward.ttlcache import TtlCache

CACHE_SECONDS = 1.0  # how long another server's revocation may take to reach this one's cached view


class Registry:
    def __init__(self, db: Database, keys: KeyStore, audit: AuditLog) -> None:
        self.db = db
        self.keys = keys
        self.audit = audit
        self.grants = leases.Grants(db)
        # read ahead while in use (keysteward.ttlcache): a volume being released never waits for its own expiry
        self._trusts: TtlCache[str, list[ProviderTrust]] = TtlCache(CACHE_SECONDS, load=self._read_trusts)
        self._volumes: TtlCache[tuple[str, str], tuple[VolumeInfo, str, bytes | None]] = TtlCache(
            CACHE_SECONDS, load=self._read_volume
        )
        keys.on_shred.append(self._destroy_under_key)

    # -- providers ------------------------------------------------------------------------------
    def add_provider(self, actor: Principal, name: str, kind: str, pem: str, audience: str | None) -> ProviderTrust:
        check_name("provider", name)
        trust = ProviderTrust.from_pem(name, kind, pem, audience)
        try:
            with self.db.write() as conn:
                conn.execute(
                    insert(Provider).values(
                        id=str(uuid.uuid4()),
                        tenant_id=actor.tenant_id,
                        name=name,
                        kind=kind,
                        certificates_pem=pem,
                        audience=audience,
                        created_at=datetime.now(UTC),
                    )
                )
                self.audit.append(
                    conn,
                    actor.tenant_id,
                    actor=actor.describe(),
                    action="provider.add",
                    target=f"provider:{name}",
                    details={"kind": kind, "certificates": len(trust.certificates)},
                )
        except IntegrityError as exc:
            raise Conflict(f"a provider named '{name}' exists", code="provider_exists") from exc
        self._trusts.drop_where(lambda tenant, _: tenant == actor.tenant_id)
        return trust

    def remove_provider(self, actor: Principal, name: str) -> None:
        with self.db.write() as conn:
            gone = conn.execute(
                delete(Provider).where(Provider.tenant_id == actor.tenant_id, Provider.name == name)
            ).rowcount
            if not gone:
                raise NotFound(f"no provider '{name}'", code="provider_not_found")
            self.audit.append(
                conn, actor.tenant_id, actor=actor.describe(), action="provider.remove", target=f"provider:{name}"
            )
        self._trusts.drop_where(lambda tenant, _: tenant == actor.tenant_id)

    def trusts(self, tenant_id: str) -> list[ProviderTrust]:
        cached = self._trusts.get(tenant_id)
        if cached is not None:
            return cached
        trusts = self._read_trusts(tenant_id)
        self._trusts.put(tenant_id, trusts)
        return trusts

    def _read_trusts(self, tenant_id: str) -> list[ProviderTrust]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(Provider.name, Provider.kind, Provider.certificates_pem, Provider.audience)
                .where(Provider.tenant_id == tenant_id)
                .order_by(Provider.name)
            ).all()
        return [ProviderTrust.from_pem(r.name, r.kind, r.certificates_pem, r.audience) for r in rows]

    # -- volumes --------------------------------------------------------------------------------
    def insert_volume(
        self, conn: Connection, tenant_id: str, spec: VolumeSpec, volume_id: str, now: datetime, *, kind: str = VOLUME
    ) -> tuple[VolumeInfo, str]:
        """Create the volume's secret (stored only wrapped) and its row in the caller's transaction: the
        access path's ``volume.register`` bookkeeping (and ``vm.create``'s, ``kind="vm"``). Returns the volume
        and its data key's id."""
        spec.check()
        if conn.execute(select(Volume.id).where(Volume.tenant_id == tenant_id, Volume.name == spec.name)).first():
            raise Conflict(f"a volume named '{spec.name}' exists", code="volume_exists")
        dek_id, version, secret = self.keys.data.new(conn, tenant_id, spec.key, f"volume-{volume_id}", size=SECRET_SIZE)
        secret.wipe()  # delivered after the commit, unwrapped again from its stored form
        key_id = conn.execute(select(Key.id).where(Key.tenant_id == tenant_id, Key.name == spec.key)).scalar_one()
        row = dict(
            id=volume_id,
            tenant_id=tenant_id,
            name=spec.name,
            key_id=key_id,
            dek_id=dek_id,
            labels=json.dumps(spec.labels, sort_keys=True),
            binding=json.dumps(spec.binding.as_dict(), sort_keys=True),
            state=ACTIVE,
            kind=kind,
            lease_seconds=spec.lease_seconds,
            renew_seconds=spec.renew_seconds,
            grace_seconds=spec.grace_seconds,
            created_at=now,
            changed_at=now,
        )
        conn.execute(insert(Volume).values(**row))
        return volume_info(_Row(row), spec.key, version), dek_id

    def _select(self) -> Any:
        return _select_volumes()

    def get(self, tenant_id: str, volume_id: str, conn: Connection | None = None) -> VolumeInfo:
        return self._get(tenant_id, volume_id, conn)[0]

    def _get(self, tenant_id: str, volume_id: str, conn: Connection | None = None) -> tuple[VolumeInfo, Any]:
        try:
            uuid.UUID(volume_id)
        except (ValueError, TypeError, AttributeError):
            raise NotFound("no such volume", code="volume_not_found") from None
        values = {"t": tenant_id, "v": volume_id}
        if conn is None:
            with self.db.read() as c:
                row = c.execute(_VOLUME_BY_ID, values).first()
        else:
            row = conn.execute(_VOLUME_BY_ID, values).first()
        if row is None:
            raise NotFound("no such volume", code="volume_not_found")
        return volume_info(row), row

    def cached_for_release(self, tenant_id: str, volume_id: str) -> tuple[VolumeInfo, str, bytes | None] | None:
        return self._volumes.get((tenant_id, volume_id))

    def trusts_cached(self, tenant_id: str) -> bool:
        return self._trusts.get(tenant_id) is not None

    def for_release(self, tenant_id: str, volume_id: str) -> tuple[VolumeInfo, str, bytes | None]:
        """The volume, its key's id and its wrapped secret, cached for a second (the release path's read).

        The cache may lag another server's revocation by that second; the release transaction reads the
        volume's state again under a row lock, so a revoked or destroyed volume is never released.
        """
        cached = self._volumes.get((tenant_id, volume_id))
        if cached is None:
            info, row = self._get(tenant_id, volume_id)
            cached = (info, row.key_id, row.wrapped)
            self._volumes.put((tenant_id, volume_id), cached)
        return cached

    def _read_volume(self, cached: tuple[str, str]) -> tuple[VolumeInfo, str, bytes | None] | None:
        try:
            info, row = self._get(*cached)
        except NotFound:
            return None
        return info, row.key_id, row.wrapped

    def find(self, actor: Principal, ref: str) -> VolumeInfo:
        """A volume by id or by name."""
        with self.db.read() as conn:
            row = conn.execute(self._select().where(Volume.tenant_id == actor.tenant_id, Volume.name == ref)).first()
            if row is not None:
                return volume_info(row)
            return self.get(actor.tenant_id, ref, conn)

    def list(self, actor: Principal) -> list[VolumeInfo]:
        with self.db.read() as conn:
            stmt = self._select().where(Volume.tenant_id == actor.tenant_id, Volume.kind != VM)
            rows = conn.execute(stmt.order_by(Volume.name)).all()
            return [volume_info(r) for r in rows]

    def mark_revoked(self, conn: Connection, volume: VolumeInfo, *, shred: bool, now: datetime) -> None:
        """The access path's ``volume.revoke`` bookkeeping, in its transaction: holders' next renewal
        answers ``revoked`` (or ``shred``); the secret stays, so an admin can release the volume again."""
        state = SHRED if shred else REVOKED
        conn.execute(update(Volume).where(Volume.id == volume.id).values(state=state, changed_at=now))

    def shred_volume(self, conn: Connection, tenant_id: str, volume: VolumeInfo, now: datetime) -> None:
        """The access path's ``volume.destroy`` bookkeeping, in its transaction: the secret is crypto-shredded,
        the volume is destroyed and every active lease ends ``shred``. Call :meth:`changed` after the commit."""
        conn.execute(for_update(select(Volume.id).where(Volume.id == volume.id), self.db)).one()
        self.keys.data.shred(conn, tenant_id, volume.dek_id)
        self._mark_destroyed(conn, volume.id, now)

    def changed(self, volume: VolumeInfo, *, shredded: bool = False) -> VolumeInfo:
        """After a committed state change: this server forgets its cached view and answers the new state."""
        if shredded:
            self.keys.data.after_shred()
        self._forget(volume.id)
        return self.get(volume.tenant_id, volume.id)

    @staticmethod
    def _mark_destroyed(conn: Connection, volume_id: str, now: datetime) -> None:
        """The volume is destroyed and its live leases end in ``shred``: each holder's next renewal says so."""
        conn.execute(update(Volume).where(Volume.id == volume_id).values(state=DESTROYED, changed_at=now))
        conn.execute(
            update(Lease).where(Lease.volume_id == volume_id, Lease.state == ACTIVE).values(state=SHRED, ended_at=now)
        )

    def _destroy_under_key(self, conn: Connection, tenant_id: str, key_id: str, version: int | None, actor: str) -> int:
        """A key (version) is being destroyed in ``conn``'s transaction: every volume whose secret it held is
        destroyed with it, each with its ``volume.destroy`` record in the same transaction."""
        stmt = (
            select(Volume.id, Volume.name, DataKey.kek_version)
            .join(DataKey, DataKey.id == Volume.dek_id)
            .where(Volume.tenant_id == tenant_id, Volume.key_id == key_id, Volume.state != DESTROYED)
            .order_by(Volume.name)
        )
        if version is not None:
            stmt = stmt.where(DataKey.kek_version == version)
        rows = conn.execute(stmt).all()
        now = datetime.now(UTC)
        cause = "key destroyed" if version is None else f"key version {version} destroyed"
        for row in rows:
            self._mark_destroyed(conn, row.id, now)
            self.audit.append(
                conn,
                tenant_id,
                actor=actor,
                action="volume.destroy",
                target=f"volume:{row.id}",
                details={"name": row.name, "reason": cause, "key_version": row.kek_version},
            )
        for row in rows:
            self._forget(row.id)
        return len(rows)

    def forget(self, volume_id: str) -> None:
        """Drop this server's cached view of a volume whose row changed in a committed transaction."""
        self._forget(volume_id)

    def _forget(self, volume_id: str) -> None:
        self._volumes.drop_where(lambda key, _: key[1] == volume_id)

    def leases(self, tenant_id: str, volume_id: str | None) -> Sequence[leases.LeaseInfo]:
        """The tenant's leases (of one volume), newest first."""
        with self.db.read() as conn:
            return leases.listing(conn, tenant_id, volume_id)

    # -- instances ------------------------------------------------------------------------------
    def revoke_instance(self, actor: Principal, holder: str, *, shred: bool, reason: str) -> None:
        """The instance's (or host's) renewals answer revoked; a host's certificates are revoked too."""
        if not 0 < len(holder) <= 256 or (holder.count("/") < 2 and not holder.startswith("host:")):
            raise BadRequest("an instance is named provider/account/instance_id, a host host:NAME", code="bad_instance")
        with self.db.write() as conn:
            conn.execute(
                delete(RevokedInstance).where(
                    RevokedInstance.tenant_id == actor.tenant_id, RevokedInstance.holder == holder
                )
            )
            conn.execute(
                insert(RevokedInstance).values(
                    tenant_id=actor.tenant_id,
                    holder=holder,
                    shred=shred,
                    reason=reason[:500],
                    created_at=datetime.now(UTC),
                )
            )
            # a host's certificates end with it, in the same transaction: no listener accepts them any more
            host = holder.removeprefix("host:") if holder.startswith("host:") else None
            certs = revoke_host_certs(conn, actor.tenant_id, host, reason) if host else []
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="instance.revoke",
                target=actor_of(holder),
                details={"shred": shred, "reason": reason[:500], "revoked_certs": certs},
            )

    @staticmethod
    def instance_revocation(conn: Connection, tenant_id: str, holder: str) -> bool | None:
        """None if the instance is not revoked, else whether its volumes are to be shredded."""
        row = conn.execute(REVOCATION, {"t": tenant_id, "h": holder}).first()
        return None if row is None else bool(row.shred)


def _select_volumes() -> Any:
    return (
        select(
            Volume.__table__,
            Key.name.label("key_name"),
            DataKey.kek_version.label("key_version"),
            DataKey.wrapped.label("wrapped"),
        )
        .join(Key, Key.id == Volume.key_id)
        .join(DataKey, DataKey.id == Volume.dek_id)
    )


_VOLUME_BY_ID = _select_volumes().where(Volume.tenant_id == bindparam("t"), Volume.id == bindparam("v"))
"""A release's volume read (each volume of a boot storm is read once): built once, values bound at execution."""
REVOCATION = select(RevokedInstance.shred).where(
    RevokedInstance.tenant_id == bindparam("t"), RevokedInstance.holder == bindparam("h")
)
"""Built once, values bound at execution: every release and renewal reads it on the audit writer thread."""


class _Row:
    """Attribute access over the values just inserted (to build a VolumeInfo without reading back)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
