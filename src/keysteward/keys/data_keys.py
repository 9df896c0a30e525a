"""Data keys stored under a tenant key: made, listed, opened, unwrapped and crypto-shredded.

A data key (a volume's keyslot secret, a KMIP object's material, a stored DEK) exists only wrapped under a
version of its tenant key (AES-256-GCM, AAD tenant|key|version|id); KEK rotation rewraps it
(:mod:`keysteward.keys.rewrap`), destroying the version or the key shreds it. The KEKs and their lifecycle
are :class:`keysteward.keys.keystore.KeyStore`, which holds one of these as ``KeyStore.data``.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, DateTime, LargeBinary, select, update
from sqlalchemy.exc import IntegrityError

from keysteward.crypto.secret import SecretBuffer
from keysteward.errors import Conflict, NotFound
from keysteward.identity.principal import Principal, check_name
from keysteward.keys.model import DataKeyInfo, KeyRef
from keysteward.keys.wrapping import dek_aad
from keysteward.store.db import checkpoint
from keysteward.store.driver import DriverStatement
from keysteward.store.models import DataKey

if TYPE_CHECKING:
    from keysteward.crypto.aead import AeadKey
    from keysteward.keys.keystore import KeyStore


_INSERT = DriverStatement(
    "INSERT INTO data_keys (id, tenant_id, key_id, name, kek_version, wrapped, created_at) "
    "VALUES (:id, :tenant_id, :key_id, :name, :kek_version, :wrapped, :created_at)",
    binds={"wrapped": LargeBinary(), "created_at": DateTime(timezone=True)},
)
"""On the driver's connection (keysteward/store/driver.py): a KMIP Create makes one per object."""
_PRIMARY = DriverStatement(
    "SELECT k.id, k.name, k.state, k.primary_version, v.state, v.wrapped FROM keys k "
    "LEFT JOIN key_versions v ON v.key_id = k.id AND v.version = k.primary_version "
    "WHERE k.tenant_id = :t AND k.name = :n",
    columns=(None, None, None, None, None, LargeBinary()),
)
"""A key and its primary version in one statement: a KMIP Create read them with two statements through
SQLAlchemy, a twentieth of its server's interpreter time."""


class DataKeys:
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    def new(
        self,
        conn: Connection,
        tenant_id: str,
        key_name: str,
        name: str,
        *,
        size: int = 64,
        material: bytes | bytearray | None = None,
    ) -> tuple[str, int, SecretBuffer]:
        """Insert a fresh data key of ``size`` bytes (or the caller's ``material``: a KMIP Register) under
        ``key_name``'s primary version, in the caller's transaction.

        Returns its id, the KEK version and the plaintext in a locked buffer the caller wipes.
        """
        check_name("data key", name)
        dek_id = str(uuid.uuid4())
        row, kek = self._primary(conn, tenant_id, key_name)
        dek = SecretBuffer.from_bytes(bytearray(os.urandom(size) if material is None else material))
        try:
            wrapped = kek.seal(dek.view(), dek_aad(tenant_id, row.id, row.primary_version, dek_id))
            try:  # no savepoint of its own: a clash spoils the caller's transaction, which never goes on after it
                _INSERT.rows(
                    conn,
                    {
                        "id": dek_id,
                        "tenant_id": tenant_id,
                        "key_id": row.id,
                        "name": name,
                        "kek_version": row.primary_version,
                        "wrapped": wrapped,
                        "created_at": datetime.now(UTC),
                    },
                )
            except IntegrityError as exc:
                raise Conflict(
                    f"key '{key_name}' already has a data key named '{name}'", code="data_key_exists"
                ) from exc
        except BaseException:
            dek.wipe()
            raise
        return dek_id, row.primary_version, dek

    def _primary(self, conn: Connection, tenant_id: str, name: str) -> tuple[KeyRef, AeadKey]:
        """An enabled key and its primary version's KEK, or the error :meth:`KeyStore.key_row`,
        :meth:`KeyStore.require_enabled` or :meth:`KeyStore.kek` would raise, in that order."""
        rows = _PRIMARY.rows(conn, {"t": tenant_id, "n": name})
        if not rows:
            raise NotFound(f"no key '{name}'", code="key_not_found")
        key_id, key_name, state, version, version_state, wrapped = rows[0]
        ref = KeyRef(key_id, key_name, state, version)
        self.keys.require_enabled(ref)
        return ref, self.keys.open_kek(tenant_id, key_id, version, version_state, wrapped)

    def create(self, actor: Principal, key_name: str, name: str) -> DataKeyInfo:
        with self.keys.db.write() as conn:
            dek_id, version, dek = self.new(conn, actor.tenant_id, key_name, name)
            dek.wipe()
            self.keys.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="data_key.create",
                target=f"data_key:{name}",
                details={"key": key_name, "kek_version": version, "id": dek_id},
            )
        return DataKeyInfo(dek_id, name, key_name, version, datetime.now(UTC), False)

    def shred(self, conn: Connection, tenant_id: str, dek_id: str) -> None:
        """Destroy one data key's only stored form, in the caller's transaction (call :meth:`after_shred`)."""
        conn.execute(update(DataKey).where(DataKey.tenant_id == tenant_id, DataKey.id == dek_id).values(wrapped=None))

    def after_shred(self) -> None:
        checkpoint(self.keys.db)

    def listing(self, actor: Principal, key_name: str) -> list[DataKeyInfo]:
        with self.keys.db.read() as conn:
            row = self.keys.key_row(conn, actor.tenant_id, key_name)
            rows = conn.execute(
                select(
                    DataKey.id,
                    DataKey.name,
                    DataKey.kek_version,
                    DataKey.created_at,
                    DataKey.wrapped.is_(None).label("shredded"),
                )
                .where(DataKey.key_id == row.id)
                .order_by(DataKey.name)
            ).all()
        return [DataKeyInfo(r.id, r.name, key_name, r.kek_version, r.created_at, bool(r.shredded)) for r in rows]

    def openable(self, tenant_id: str, key_id: str, wrapped: bytes | None) -> None:
        """Raise what :meth:`open` raises for a data key that cannot be opened now: crypto-shredded, or its key
        unknown, disabled or destroyed (the cached key state)."""
        if wrapped is None:
            raise Conflict("this data key was crypto-shredded", code="data_key_shredded")
        ref = self.keys.key_ref(tenant_id, key_id=key_id)
        if ref is None:
            raise NotFound("no such data key", code="data_key_not_found")
        self.keys.require_enabled(ref)

    def open(self, tenant_id: str, key_id: str, kek_version: int, dek_id: str, wrapped: bytes | None) -> SecretBuffer:
        """A data key from its wrapped form (read by the caller), with the cached KEK and key state."""
        self.openable(tenant_id, key_id, wrapped)
        assert wrapped is not None
        kek = self.keys.usable_kek(tenant_id, key_id, kek_version)
        return SecretBuffer.from_bytes(kek.open(wrapped, dek_aad(tenant_id, key_id, kek_version, dek_id)))

    def unwrap(self, tenant_id: str, dek_id: str) -> SecretBuffer:
        """The plaintext DEK in a locked buffer, for the release service (the caller wipes it)."""
        with self.keys.db.read() as conn:
            row = conn.execute(
                select(DataKey.__table__).where(DataKey.tenant_id == tenant_id, DataKey.id == dek_id)
            ).first()
            if row is None:
                raise NotFound("no such data key", code="data_key_not_found")
            if row.wrapped is None:
                raise Conflict("this data key was crypto-shredded", code="data_key_shredded")
            key = self.keys.key_by_id(conn, tenant_id, row.key_id)
            assert key is not None
            self.keys.require_enabled(key)
            kek = self.keys.kek(conn, tenant_id, row.key_id, row.kek_version)
            return SecretBuffer.from_bytes(
                kek.open(row.wrapped, dek_aad(tenant_id, row.key_id, row.kek_version, dek_id))
            )
