"""KMIP managed objects in the database: their records, and their material as data keys under the tenant's KEK.

An object's material is a row of ``data_keys`` wrapped under the primary version of the tenant key named by
``[kmip] kek`` (``kmip`` by default, created on first use), so the key hierarchy holds it like any DEK: KEK
rotation rewraps it, a KEK destroy shreds it, Destroy crypto-shreds it (the wrapped row is emptied). The
record (``kmip_objects``) holds no material. Every function that writes runs in the caller's transaction,
where the access path writes the audit record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, DateTime, LargeBinary, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import TypeEngine

from keysteward.crypto.secret import SecretBuffer
from keysteward.errors import Conflict, Denied, NotFound
from keysteward.identity.principal import Principal
from keysteward.keys.keystore import KeyStore
from keysteward.store.driver import DriverStatement
from keysteward.store.frontend_models import KmipObject
from keysteward.store.models import Key
from keysteward.ttlcache import TtlCache

DEFAULT_KEK = "kmip"
MAX_LOCATE_SCAN = 100_000
"""Rows one Locate may look at; its answer is bounded separately by Maximum Items."""
RECENT_SECONDS = 30.0
"""How long a record read is kept to decide the next request on the object without a read. The decision is
made on it, then checked in the transaction with the audit record: a record changed meanwhile (by any
server) makes the request :class:`Stale`, and it is asked again on a fresh read."""
FETCH_GRANULARITY = timedelta(hours=1)
"""``last_get_at`` is written when it is older than this: the stale-key report counts days, and a Get that
writes nothing but its audit record costs the writer far less."""

# fixed statements on the driver's connection (keysteward/store/driver.py): for these one-row statements,
# SQLAlchemy's execution cost several times what the database took to run them
_UTC = DateTime(timezone=True)
_RECORD_COLUMNS = ("id", "tenant_id", "object_type", "state", "name", "data_key_id", "attributes", "created_by",
                   "created_at", "updated_at", "last_get_at")  # fmt: skip
"""A record's eleven columns, in :class:`KmipRecord`'s order (the statements below spell them out)."""
_RECORD_TYPES: tuple[TypeEngine[Any] | None, ...] = (None,) * 8 + (_UTC,) * 3
"""Their result types."""
_BY_ID = DriverStatement(
    """
SELECT kmip_objects.id, kmip_objects.tenant_id, kmip_objects.object_type, kmip_objects.state, kmip_objects.name,
    kmip_objects.data_key_id, kmip_objects.attributes, kmip_objects.created_by, kmip_objects.created_at,
    kmip_objects.updated_at, kmip_objects.last_get_at
FROM kmip_objects WHERE kmip_objects.tenant_id = :t AND kmip_objects.id = :u
""",
    columns=_RECORD_TYPES,
)
_WITH_WRAPPED = DriverStatement(
    """
SELECT kmip_objects.id, kmip_objects.tenant_id, kmip_objects.object_type, kmip_objects.state, kmip_objects.name,
    kmip_objects.data_key_id, kmip_objects.attributes, kmip_objects.created_by, kmip_objects.created_at,
    kmip_objects.updated_at, kmip_objects.last_get_at,
    data_keys.key_id, data_keys.kek_version, data_keys.wrapped
FROM kmip_objects LEFT OUTER JOIN data_keys ON data_keys.id = kmip_objects.data_key_id
WHERE kmip_objects.tenant_id = :t AND kmip_objects.id = :u
""",
    columns=(*_RECORD_TYPES, None, None, LargeBinary()),
)
"""The record, and its material's KEK id, KEK version and wrapped bytes (NULL without material)."""
_MATERIAL = DriverStatement(
    "SELECT key_id, kek_version, wrapped FROM data_keys WHERE tenant_id = :t AND id = :d",
    columns=(None, None, LargeBinary()),
)
"""An object's material as stored now: its KEK id, KEK version and wrapped bytes (NULL once shredded)."""
_INSERT = DriverStatement(
    "INSERT INTO kmip_objects (id, tenant_id, object_type, state, name, data_key_id, attributes, created_by, "
    "created_at, updated_at) VALUES (:id, :tenant_id, :object_type, :state, :name, :data_key_id, :attributes, "
    ":created_by, :created_at, :updated_at)",
    binds={"created_at": _UTC, "updated_at": _UTC},
)
_SAVE = DriverStatement(
    "UPDATE kmip_objects SET state = :state, name = :name, attributes = :attributes, updated_at = :updated_at "
    "WHERE kmip_objects.tenant_id = :t AND kmip_objects.id = :u",
    binds={"updated_at": _UTC},
)
_FETCHED = DriverStatement(
    "UPDATE kmip_objects SET last_get_at = :now WHERE kmip_objects.tenant_id = :t AND kmip_objects.id = :u",
    binds={"now": _UTC},
)


class Stale(Denied):
    """The object changed between the decision and its transaction: nothing was done; ask again."""

    def __init__(self) -> None:
        super().__init__("the object changed while the request was decided", code="kmip_stale")


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


@dataclass(frozen=True)
class Wrapped:
    """An object's material as stored, read in the transaction that decided its release."""

    kek_id: str
    kek_version: int
    data_key_id: str
    wrapped: bytes | None


def _record(row: Sequence[Any]) -> KmipRecord:
    """A record from the first eleven columns of a row, in :data:`_RECORD_COLUMNS`' order (:data:`_BY_ID`'s)."""
    created, updated = _utc(row[8]), _utc(row[9])
    assert created is not None and updated is not None
    return KmipRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], created, updated, _utc(row[10]))


def _utc(value: datetime | None) -> datetime | None:  # SQLite hands back naive datetimes
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class KmipObjects:
    def __init__(self, keys: KeyStore, kek: str = DEFAULT_KEK) -> None:
        self.keys = keys
        self.kek = kek
        self._recent: TtlCache[tuple[str, str], tuple[KmipRecord, tuple[str, int] | None]] = TtlCache(RECENT_SECONDS)
        """(tenant, uid) -> the record last read or written here, and its material's KEK (id, version)."""
        self.platform_of: Callable[[str, str], dict[str, Any]] = lambda _tenant_id, _holder: {"tee": "none"}
        """A machine's verified platform facts (``tenant_id``, ``hypervisor:NAME``): its latest TPM quote's, from
        :class:`keysteward.release.platform_reports.PlatformReports` (set where the services are built)."""
        self.platform_warm: Callable[[str, str], bool] = lambda _tenant_id, _holder: True
        """Whether :attr:`platform_of` answers ``(tenant_id, holder)`` from memory now."""

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
        describe: Callable[[bytes], str] | None = None,
    ) -> int:
        """Store ``record`` with fresh material of ``size`` bytes or the client's ``material``; the KEK version.
        ``describe`` gets the SHA-256 digest of the material (b"" without one: the KMIP Digest attribute of a
        key) and gives the record's attributes, so the row is written once."""
        version, digest = 0, b""
        if size or material is not None:
            dek_id, version, dek = self.keys.data.new(
                conn, record.tenant_id, self.kek, f"kmip-{record.uid}", size=size, material=material
            )
            digest = hashlib.sha256(dek.view()).digest()
            dek.wipe()
            record.data_key_id = dek_id
        if describe is not None:
            record.attributes = describe(digest)
        _INSERT.rows(conn, {
            "id": record.uid, "tenant_id": record.tenant_id, "object_type": record.object_type, "state": record.state,
            "name": record.name, "data_key_id": record.data_key_id, "attributes": record.attributes,
            "created_by": record.created_by, "created_at": record.created_at, "updated_at": record.updated_at,
        })  # fmt: skip
        return version

    def get(self, tenant_id: str, uid: str, conn: Connection | None = None) -> KmipRecord | None:
        """The record as stored now (in ``conn``'s transaction when given)."""
        if conn is not None:
            rows = _BY_ID.rows(conn, {"t": tenant_id, "u": uid})
        else:
            with self.keys.db.read() as c:
                rows = _WITH_WRAPPED.rows(c, {"t": tenant_id, "u": uid})
        if not rows:
            self._recent.drop((tenant_id, uid))
            return None
        row = rows[0]
        record = _record(row)
        if conn is None:
            self._remember(record, (row[11], row[12]) if row[11] is not None else None)
        return record

    def recent(self, tenant_id: str, uid: str) -> KmipRecord | None:
        """A copy of the record last read or written here (at most :data:`RECENT_SECONDS` old), or None."""
        hit = self._recent.get((tenant_id, uid))
        return None if hit is None else dataclasses.replace(hit[0])

    def recent_kek(self, tenant_id: str, uid: str) -> tuple[str, int] | None:
        hit = self._recent.get((tenant_id, uid))
        return None if hit is None else hit[1]

    def lookup(self, tenant_id: str, uid: str) -> KmipRecord | None:
        """The recent record, else the stored one: what a decision is made on (checked again by :meth:`current`)."""
        return self.recent(tenant_id, uid) or self.get(tenant_id, uid)

    def forget(self, tenant_id: str, uid: str) -> None:
        self._recent.drop((tenant_id, uid))

    def _remember(self, record: KmipRecord, kek: tuple[str, int] | None) -> None:
        self._recent.put((record.tenant_id, record.uid), (dataclasses.replace(record), kek))

    def current(self, conn: Connection, decided: KmipRecord) -> tuple[KmipRecord | None, Wrapped | None]:
        """The record as of ``conn``'s transaction (None when it is gone) and its material's wrapped row (None:
        it has none). Raises :class:`Stale` when the record is not the one the decision was made on: another
        request changed it meanwhile, here or on another server."""
        rows = _WITH_WRAPPED.rows(conn, {"t": decided.tenant_id, "u": decided.uid})
        if not rows:
            return None, None
        row = rows[0]
        record = _record(row)
        if record.updated_at != decided.updated_at or record.state != decided.state:
            self.forget(decided.tenant_id, decided.uid)
            raise Stale()
        kek_id, kek_version, wrapped = row[11:14]
        if record.data_key_id is None or kek_id is None:
            return record, None
        return record, Wrapped(kek_id, kek_version, record.data_key_id, wrapped)

    def save(self, conn: Connection, record: KmipRecord, now: datetime) -> None:
        record.updated_at = now
        _SAVE.rows(conn, {"t": record.tenant_id, "u": record.uid, "state": record.state, "name": record.name,
                             "attributes": record.attributes, "updated_at": now})  # fmt: skip
        self.forget(record.tenant_id, record.uid)  # the transaction may still fail: the next request reads

    def fetched(self, conn: Connection, record: KmipRecord, now: datetime) -> None:
        """Note a Get (to :data:`FETCH_GRANULARITY`): what the stale-key report reads."""
        if record.last_get_at is not None and now - record.last_get_at < FETCH_GRANULARITY:
            return
        _FETCHED.rows(conn, {"t": record.tenant_id, "u": record.uid, "now": now})
        record.last_get_at = now

    def shred(self, conn: Connection, record: KmipRecord) -> None:
        """Crypto-shred the material: the only wrapped copy is emptied (call :meth:`after_shred` after the commit)."""
        if record.data_key_id is not None:
            self.keys.data.shred(conn, record.tenant_id, record.data_key_id)

    def after_shred(self) -> None:
        self.keys.data.after_shred()

    def openable(self, tenant_id: str, wrapped: Wrapped) -> None:
        """Raise what :meth:`open` would for material that cannot be opened now (shredded, its KEK disabled or
        destroyed): checked in a Get's transaction, so its audit record says it was refused."""
        self.keys.data.openable(tenant_id, wrapped.kek_id, wrapped.wrapped)

    def open(self, tenant_id: str, wrapped: Wrapped) -> SecretBuffer:
        """The plaintext material of a row read by :meth:`wrapped`, unwrapped with the cached KEK (the caller
        wipes it); refused once shredded."""
        return self.keys.data.open(tenant_id, wrapped.kek_id, wrapped.kek_version, wrapped.data_key_id, wrapped.wrapped)

    def material(self, record: KmipRecord) -> SecretBuffer:
        """The plaintext material in a locked buffer (the caller wipes it); refused once shredded. The wrapped
        row is read now; it is opened as :meth:`open` does, with the cached KEK and key state (the decrypt
        path's one-second rule)."""
        if record.data_key_id is None:
            raise Conflict("this object has no material", code="kmip_no_material")
        with self.keys.db.read() as conn:
            rows = _MATERIAL.rows(conn, {"t": record.tenant_id, "d": record.data_key_id})
        if not rows:
            raise NotFound("no such data key", code="data_key_not_found")
        kek_id, kek_version, wrapped = rows[0]
        return self.open(record.tenant_id, Wrapped(kek_id, kek_version, record.data_key_id, wrapped))

    def candidates(
        self, tenant_id: str, *, object_type: str | None, state: str | None, name: str | None
    ) -> list[KmipRecord]:
        """Records matching the indexed filters, oldest first, at most :data:`MAX_LOCATE_SCAN`."""
        table = KmipObject.__table__
        stmt = select(*(table.c[column] for column in _RECORD_COLUMNS)).where(KmipObject.tenant_id == tenant_id)
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
