"""KMIP managed objects in the database: their records, and their material as data keys under the tenant's KEK.

An object's material is a row of ``data_keys`` wrapped under the primary version of the tenant key named by
``[kmip] kek`` (``kmip`` by default, created on first use), so the key hierarchy holds it like any DEK: KEK
rotation rewraps it, a KEK destroy shreds it, Destroy crypto-shreds it (the wrapped row is emptied). The
record (``kmip_objects``) holds no material. Every function that writes runs in the caller's transaction,
where the access path writes the audit record.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from keysteward.crypto.secret import SecretBuffer
from keysteward.errors import Conflict
from keysteward.identity.principal import Principal
from keysteward.keys.keystore import KeyStore
from keysteward.store.frontend_models import KmipObject
from keysteward.store.models import Key

DEFAULT_KEK = "kmip"
MAX_LOCATE_SCAN = 100_000
"""Rows one Locate may look at; its answer is bounded separately by Maximum Items."""


@dataclass
class KmipRecord:
    uid: str
    tenant_id: str
    object_type: str
    state: str
    name: str | None
    data_key_id: str | None
    attributes: str
    created_by: str
    created_at: datetime
    updated_at: datetime
    last_get_at: datetime | None


def _record(row: Any) -> KmipRecord:
    created, updated = _utc(row.created_at), _utc(row.updated_at)
    assert created is not None and updated is not None
    return KmipRecord(
        row.id, row.tenant_id, row.object_type, row.state, row.name, row.data_key_id, row.attributes,
        row.created_by, created, updated, _utc(row.last_get_at),
    )  # fmt: skip


def _utc(value: datetime | None) -> datetime | None:  # SQLite hands back naive datetimes
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class KmipObjects:
    def __init__(self, keys: KeyStore, kek: str = DEFAULT_KEK) -> None:
        self.keys = keys
        self.kek = kek
        self.platform_of: Callable[[str, str], dict[str, Any]] = lambda _tenant_id, _holder: {"tee": "none"}
        """A machine's verified platform facts (``tenant_id``, ``hypervisor:NAME``): its latest TPM quote's, from
        :class:`keysteward.release.platform_reports.PlatformReports` (set where the services are built)."""

    def ensure_kek(self, conn: Connection, tenant_id: str, actor: Principal) -> None:
        """The tenant's KMIP KEK exists: made, in the caller's transaction (a permitted Create or Register, after
        the policy's decision), at the first one, audited as ``key.create``."""
        if self.keys.key_ref(tenant_id, name=self.kek) is not None:
            return
        if conn.execute(select(Key.id).where(Key.tenant_id == tenant_id, Key.name == self.kek)).first() is not None:
            return
        try:
            with conn.begin_nested():
                self.keys.create_in(conn, actor, self.kek, "KEK of the KMIP front-end's objects")
        except IntegrityError:
            pass  # another server made it first

    def new_uid(self) -> str:
        return str(uuid.uuid4())

    def insert(
        self,
        conn: Connection,
        record: KmipRecord,
        *,
        size: int = 0,
        material: bytes | None = None,
    ) -> tuple[int, bytes]:
        """Store ``record`` with fresh material of ``size`` bytes or the client's ``material``: the KEK version,
        and the SHA-256 digest of the material (the KMIP Digest attribute of a key)."""
        version, digest = 0, b""
        if size or material is not None:
            dek_id, version, dek = self.keys.data.new(
                conn, record.tenant_id, self.kek, f"kmip-{record.uid}", size=size, material=material
            )
            digest = hashlib.sha256(dek.view()).digest()
            dek.wipe()
            record.data_key_id = dek_id
        conn.execute(
            insert(KmipObject).values(
                id=record.uid, tenant_id=record.tenant_id, object_type=record.object_type, state=record.state,
                name=record.name, data_key_id=record.data_key_id, attributes=record.attributes,
                created_by=record.created_by, created_at=record.created_at, updated_at=record.updated_at,
            )
        )  # fmt: skip
        return version, digest

    def get(self, tenant_id: str, uid: str, conn: Connection | None = None) -> KmipRecord | None:
        stmt = select(KmipObject.__table__).where(KmipObject.tenant_id == tenant_id, KmipObject.id == uid)
        if conn is not None:
            row = conn.execute(stmt).first()
        else:
            with self.keys.db.read() as c:
                row = c.execute(stmt).first()
        return None if row is None else _record(row)

    def save(self, conn: Connection, record: KmipRecord, now: datetime) -> None:
        record.updated_at = now
        conn.execute(
            update(KmipObject)
            .where(KmipObject.tenant_id == record.tenant_id, KmipObject.id == record.uid)
            .values(state=record.state, name=record.name, attributes=record.attributes, updated_at=now)
        )

    def fetched(self, conn: Connection, record: KmipRecord, now: datetime) -> None:
        conn.execute(
            update(KmipObject)
            .where(KmipObject.tenant_id == record.tenant_id, KmipObject.id == record.uid)
            .values(last_get_at=now)
        )

    def shred(self, conn: Connection, record: KmipRecord) -> None:
        """Crypto-shred the material: the only wrapped copy is emptied (call :meth:`after_shred` after the commit)."""
        if record.data_key_id is not None:
            self.keys.data.shred(conn, record.tenant_id, record.data_key_id)

    def after_shred(self) -> None:
        self.keys.data.after_shred()

    def material(self, record: KmipRecord) -> SecretBuffer:
        """The plaintext material in a locked buffer (the caller wipes it); refused once shredded."""
        if record.data_key_id is None:
            raise Conflict("this object has no material", code="kmip_no_material")
        return self.keys.data.unwrap(record.tenant_id, record.data_key_id)

    def candidates(
        self, tenant_id: str, *, object_type: str | None, state: str | None, name: str | None
    ) -> list[KmipRecord]:
        """Records matching the indexed filters, oldest first, at most :data:`MAX_LOCATE_SCAN`."""
        stmt = select(KmipObject.__table__).where(KmipObject.tenant_id == tenant_id)
        if object_type is not None:
            stmt = stmt.where(KmipObject.object_type == object_type)
        if state is not None:
            stmt = stmt.where(KmipObject.state == state)
        if name is not None:
            stmt = stmt.where(KmipObject.name == name)
        stmt = stmt.order_by(KmipObject.created_at, KmipObject.id).limit(MAX_LOCATE_SCAN)
        with self.keys.db.read() as conn:
            return [_record(row) for row in conn.execute(stmt)]

    def stats(self, tenant_id: str) -> dict[str, int]:
        with self.keys.db.read() as conn:
            rows = conn.execute(
                select(KmipObject.state, func.count())
                .where(KmipObject.tenant_id == tenant_id)
                .group_by(KmipObject.state)
            ).all()
        return {state: int(count) for state, count in rows}
