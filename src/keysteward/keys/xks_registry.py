"""External key stores (AWS KMS XKS): their URI prefixes, SigV4 credentials and external keys.

A store is a URI path prefix of the XKS listener owned by one tenant, with the AWS region of the KMS
that calls it. Its SigV4 credentials are access key id / secret access key pairs in the spec's alphabet;
the secret is kept only wrapped under the root key (SigV4 verification needs the secret itself, so it
cannot be a hash) and is shown once, when the credential is made. Any number up to
:data:`MAX_ACTIVE_CREDENTIALS` may be active at once, so credentials rotate without a restart: add one,
update the KMS custom key store, retire the old one. Retiring takes effect on every server within
:data:`STATE_TTL_SECONDS`.

An external key id of a store names a tenant key (:mod:`keysteward.keys.xks_crypto` does its
AES-GCM) and carries the key's usage: ``both``, ``encrypt``, ``decrypt`` or ``none``.
Every change is audited in the transaction that makes it.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from keysteward.audit.log import AuditLog
from keysteward.errors import BadRequest, Conflict, NotFound
from keysteward.formats.xks_wire import KEY_ID_RE, check_prefix
from keysteward.identity.principal import Principal, check_name
from keysteward.keys.keystore import KeyStore
from keysteward.keys.root import RootOfTrust
from keysteward.store.db import Database
from keysteward.store.frontend_models import XksCredential, XksKey, XksStore
from keysteward.store.models import Key, Tenant
from keysteward.ttlcache import TtlCache

STATE_TTL_SECONDS = 1.0
MAX_ACTIVE_CREDENTIALS = 4
USAGES: dict[str, tuple[str, ...]] = {
    "both": ("ENCRYPT", "DECRYPT"),
    "encrypt": ("ENCRYPT",),
    "decrypt": ("DECRYPT",),
    "none": (),
}
REGION_RE = re.compile(r"[a-z]{2}(-[a-z0-9]+){1,3}")


def credential_aad(tenant_id: str, prefix: str, access_key_id: str) -> bytes:
    return f"keysteward/v1/xks-credential|{tenant_id}|{prefix}|{access_key_id}".encode()


@dataclass(frozen=True)
class StoreRef:
    prefix: str
    tenant_id: str
    tenant: str
    region: str


@dataclass(frozen=True)
class StoreInfo:
    prefix: str
    uri_path: str
    region: str
    created_at: datetime
    active_credentials: int


@dataclass(frozen=True, repr=False)
class NewCredential:
    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:
        return f"NewCredential({self.access_key_id})"


@dataclass(frozen=True)
class CredentialInfo:
    access_key_id: str
    prefix: str
    created_at: datetime
    retired_at: datetime | None


@dataclass(frozen=True)
class KeyLink:
    """An external key id of a store: the tenant key doing its cryptography and what it may be used for."""

    prefix: str
    external_id: str
    key_id: str
    key_name: str
    usage: str
    state: str

    @property
    def key_usage(self) -> tuple[str, ...]:
        return USAGES[self.usage]


class XksRegistry:
    def __init__(self, db: Database, root: RootOfTrust, keys: KeyStore, audit: AuditLog) -> None:
        self.db = db
        self.root = root
        self.keys = keys
        self.audit = audit
        # read ahead while in use (keysteward.ttlcache): a busy store never waits for its own expiry
        self._stores: TtlCache[str, StoreRef] = TtlCache(STATE_TTL_SECONDS, load=self._read_store)
        self._secrets: TtlCache[tuple[str, str], str] = TtlCache(STATE_TTL_SECONDS, load=self._reread_secret)
        self._links: TtlCache[tuple[str, str], KeyLink] = TtlCache(STATE_TTL_SECONDS, load=self._read_link)
        root.on_seal(self._secrets.clear)

    # -- the hot path ---------------------------------------------------------------------------
    def store(self, prefix: str) -> StoreRef | None:
        hit = self._stores.get(prefix)
        if hit is not None:
            return hit
        ref = self._read_store(prefix)
        if ref is not None:
            self._stores.put(prefix, ref)
        return ref

    def _read_store(self, prefix: str) -> StoreRef | None:
        with self.db.read() as conn:
            row = conn.execute(
                select(XksStore.prefix, XksStore.tenant_id, XksStore.region, Tenant.name)
                .join(Tenant, Tenant.id == XksStore.tenant_id)
                .where(XksStore.prefix == prefix)
            ).first()
        return None if row is None else StoreRef(row.prefix, row.tenant_id, row.name, row.region)

    def warm(self, prefix: str, access_key_id: str | None) -> bool:
        """Whether :meth:`store` and :meth:`secret` would answer from memory right now."""
        if self._stores.get(prefix) is None:
            return False
        return access_key_id is None or self._secrets.get((prefix, access_key_id)) is not None

    def secret(self, store: StoreRef, access_key_id: str) -> str | None:
        """The secret access key of an active credential of ``store``, or None (unknown, retired, another store's)."""
        hit = self._secrets.get((store.prefix, access_key_id))
        if hit is not None:
            return hit
        secret = self._read_secret(store, access_key_id)
        if secret is not None:
            self._secrets.put((store.prefix, access_key_id), secret)
        return secret

    def _reread_secret(self, cached: tuple[str, str]) -> str | None:
        prefix, access_key_id = cached
        store = self.store(prefix)
        return None if store is None else self._read_secret(store, access_key_id)

    def _read_secret(self, store: StoreRef, access_key_id: str) -> str | None:
        with self.db.read() as conn:
            row = conn.execute(
                select(XksCredential.secret_wrapped).where(
                    XksCredential.access_key_id == access_key_id,
                    XksCredential.prefix == store.prefix,
                    XksCredential.retired_at.is_(None),
                )
            ).first()
        if row is None:
            return None
        opened = self.root.root().open(row.secret_wrapped, credential_aad(store.tenant_id, store.prefix, access_key_id))
        try:
            return opened.decode("ascii")
        finally:
            opened[:] = bytes(len(opened))

    def cached_key(self, store: StoreRef, external_id: str) -> KeyLink | None:
        """:meth:`key` if it needs no database read now, else None."""
        return self._links.get((store.prefix, external_id))

    def key(self, store: StoreRef, external_id: str) -> KeyLink | None:
        """The external key (its ``state`` may be a second old: ask the key store for the current one)."""
        hit = self._links.get((store.prefix, external_id))
        if hit is not None:
            return hit
        link = self._read_link((store.prefix, external_id))
        if link is not None:
            self._links.put((store.prefix, external_id), link)
        return link

    def _read_link(self, cached: tuple[str, str]) -> KeyLink | None:
        with self.db.read() as conn:
            return self._link(conn, *cached)

    # -- administration -------------------------------------------------------------------------
    def _owned(self, conn: Connection, actor: Principal, prefix: str) -> XksStore:
        row = conn.execute(
            select(XksStore.__table__).where(XksStore.prefix == prefix, XksStore.tenant_id == actor.tenant_id)
        ).first()
        if row is None:
            raise NotFound(f"no external key store '{prefix[:128]}'", code="xks_store_not_found")
        return row  # type: ignore[return-value]

    @staticmethod
    def _prefix(prefix: str) -> str:
        try:
            return check_prefix(prefix)
        except ValueError as exc:
            raise BadRequest(str(exc), code="bad_xks_prefix") from None

    def create_store(self, actor: Principal, prefix: str, region: str) -> tuple[StoreInfo, NewCredential]:
        prefix = self._prefix(prefix)
        if not REGION_RE.fullmatch(region or ""):
            raise BadRequest("region must be an AWS region name such as us-east-1", code="bad_region")
        self.root.root()
        now = datetime.now(UTC)
        try:
            with self.db.write() as conn:
                conn.execute(
                    insert(XksStore).values(prefix=prefix, tenant_id=actor.tenant_id, region=region, created_at=now)
                )
                self.audit.append(
                    conn,
                    actor.tenant_id,
                    actor=actor.describe(),
                    action="xks.store.create",
                    target=f"xks_store:{prefix}",
                    details={"region": region},
                )
                credential = self._new_credential(conn, actor, prefix, now)
        except IntegrityError as exc:
            raise Conflict(
                f"an external key store with prefix '{prefix}' exists already", code="xks_store_exists"
            ) from exc
        return StoreInfo(prefix, prefix + "/kms/xks/v1", region, now, 1), credential

    def list_stores(self, actor: Principal) -> list[StoreInfo]:
        with self.db.read() as conn:
            active = (
                select(func.count())
                .where(XksCredential.prefix == XksStore.prefix, XksCredential.retired_at.is_(None))
                .scalar_subquery()
            )
            rows = conn.execute(
                select(XksStore.prefix, XksStore.region, XksStore.created_at, active.label("active"))
                .where(XksStore.tenant_id == actor.tenant_id)
                .order_by(XksStore.prefix)
            ).all()
        return [StoreInfo(r.prefix, r.prefix + "/kms/xks/v1", r.region, r.created_at, int(r.active)) for r in rows]

    def _new_credential(self, conn: Connection, actor: Principal, prefix: str, now: datetime) -> NewCredential:
        active = conn.execute(
            select(func.count()).where(XksCredential.prefix == prefix, XksCredential.retired_at.is_(None))
        ).scalar_one()
        if active >= MAX_ACTIVE_CREDENTIALS:
            raise Conflict(
                f"store '{prefix}' has {active} active credentials: retire one first", code="xks_credential_limit"
            )
        access_key_id = base64.b32encode(os.urandom(15)).decode("ascii")  # 24 of A-Z, 2-7 (the spec's 20-30)
        secret = base64.b64encode(os.urandom(32)).decode("ascii")  # 256 bits, 44 characters
        wrapped = self.root.root().seal(secret.encode(), credential_aad(actor.tenant_id, prefix, access_key_id))
        conn.execute(
            insert(XksCredential).values(
                access_key_id=access_key_id, prefix=prefix, secret_wrapped=wrapped, created_at=now
            )
        )
        self.audit.append(
            conn,
            actor.tenant_id,
            actor=actor.describe(),
            action="xks.credential.add",
            target=f"xks_credential:{access_key_id}",
            details={"store": prefix},
        )
        return NewCredential(access_key_id, secret)

    def add_credential(self, actor: Principal, prefix: str) -> NewCredential:
        prefix = self._prefix(prefix)
        self.root.root()
        with self.db.write() as conn:
            self._owned(conn, actor, prefix)
            return self._new_credential(conn, actor, prefix, datetime.now(UTC))

    def list_credentials(self, actor: Principal, prefix: str) -> list[CredentialInfo]:
        prefix = self._prefix(prefix)
        with self.db.read() as conn:
            self._owned(conn, actor, prefix)
            rows = conn.execute(
                select(XksCredential.access_key_id, XksCredential.created_at, XksCredential.retired_at)
                .where(XksCredential.prefix == prefix)
                .order_by(XksCredential.created_at)
            ).all()
        return [CredentialInfo(r.access_key_id, prefix, r.created_at, r.retired_at) for r in rows]

    def retire_credential(self, actor: Principal, access_key_id: str) -> CredentialInfo:
        now = datetime.now(UTC)
        with self.db.write() as conn:
            row = conn.execute(
                select(XksCredential.prefix, XksCredential.created_at, XksCredential.retired_at)
                .join(XksStore, XksStore.prefix == XksCredential.prefix)
                .where(XksCredential.access_key_id == access_key_id, XksStore.tenant_id == actor.tenant_id)
            ).first()
            if row is None:
                raise NotFound("no such credential", code="xks_credential_not_found")
            if row.retired_at is not None:
                raise Conflict("the credential is retired already", code="xks_credential_retired")
            conn.execute(
                update(XksCredential).where(XksCredential.access_key_id == access_key_id).values(retired_at=now)
            )
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="xks.credential.retire",
                target=f"xks_credential:{access_key_id}",
                details={"store": row.prefix},
            )
        self._secrets.drop_where(lambda key, _secret: key[1] == access_key_id)
        return CredentialInfo(access_key_id, row.prefix, row.created_at, now)

    # -- external keys --------------------------------------------------------------------------
    def _link(self, conn: Connection, prefix: str, external_id: str) -> KeyLink | None:
        row = conn.execute(
            select(XksKey.prefix, XksKey.external_id, XksKey.key_id, XksKey.usage, Key.name, Key.state)
            .join(Key, Key.id == XksKey.key_id)
            .where(XksKey.prefix == prefix, XksKey.external_id == external_id)
        ).first()
        if row is None:
            return None
        return KeyLink(row.prefix, row.external_id, row.key_id, row.name, row.usage, row.state)

    def create_key(self, actor: Principal, prefix: str, external_id: str, usage: str, key_name: str | None) -> KeyLink:
        """A new external key id of the store on a new tenant key (``key_name``, default: the id in lower case)."""
        prefix = self._prefix(prefix)
        if not KEY_ID_RE.fullmatch(external_id or ""):
            raise BadRequest("an external key id is 1-128 of A-Z, a-z, 0-9, '.', '_' and '-'", code="bad_xks_key_id")
        if usage not in USAGES:
            raise BadRequest(f"usage must be one of {', '.join(USAGES)}", code="bad_xks_usage")
        name = check_name("key", key_name or external_id.lower())
        with self.db.read() as conn:
            self._owned(conn, actor, prefix)
            if self._link(conn, prefix, external_id) is not None:
                raise Conflict(f"store '{prefix}' has an external key '{external_id}' already", code="xks_key_exists")
        info = self.keys.create(actor, name, f"external key {external_id} of XKS store {prefix}")
        try:
            with self.db.write() as conn:
                conn.execute(
                    insert(XksKey).values(
                        prefix=prefix,
                        external_id=external_id,
                        key_id=info.id,
                        usage=usage,
                        created_at=datetime.now(UTC),
                    )
                )
                self.audit.append(
                    conn,
                    actor.tenant_id,
                    actor=actor.describe(),
                    action="xks.key.create",
                    target=f"key:{name}",
                    details={"store": prefix, "external_key_id": external_id, "usage": usage},
                )
        except IntegrityError as exc:
            raise Conflict(
                f"store '{prefix}' has an external key '{external_id}' already", code="xks_key_exists"
            ) from exc
        return KeyLink(prefix, external_id, info.id, name, usage, info.state)

    def set_key_enabled(self, actor: Principal, prefix: str, external_id: str, enabled: bool) -> KeyLink:
        prefix = self._prefix(prefix)
        with self.db.read() as conn:
            self._owned(conn, actor, prefix)
            link = self._link(conn, prefix, external_id)
        if link is None:
            raise NotFound(f"no external key '{external_id[:128]}' in store '{prefix}'", code="xks_key_not_found")
        info = self.keys.set_enabled(actor, link.key_name, enabled)
        return KeyLink(prefix, external_id, link.key_id, link.key_name, link.usage, info.state)

    def list_keys(self, actor: Principal, prefix: str) -> list[KeyLink]:
        prefix = self._prefix(prefix)
        with self.db.read() as conn:
            self._owned(conn, actor, prefix)
            rows = conn.execute(
                select(XksKey.prefix, XksKey.external_id, XksKey.key_id, XksKey.usage, Key.name, Key.state)
                .join(Key, Key.id == XksKey.key_id)
                .where(XksKey.prefix == prefix)
                .order_by(XksKey.external_id)
            ).all()
        return [KeyLink(r.prefix, r.external_id, r.key_id, r.name, r.usage, r.state) for r in rows]
