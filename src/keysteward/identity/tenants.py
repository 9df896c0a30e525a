"""Tenants, their people and the people's API tokens; machine identities come from tenant CA certificates.

Every token belongs to a person (``token create NAME --role R --person P``; without ``--person`` the person
is named after the token). Approvals count people, so one person's many tokens are one vote, and each token
records who minted it (:mod:`keysteward.policy.approvals`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from keysteward.audit.log import AuditLog
from keysteward.errors import BadRequest, Conflict, NotFound, Unauthenticated
from keysteward.identity.principal import HUMAN_ROLES, SYSTEM_TENANT, Principal, check_name
from keysteward.store.db import Database
from keysteward.store.models import ApiToken, Person, Tenant
from keysteward.ttlcache import TtlCache

TOKEN_PREFIX = "kst_"  # noqa: S105 - the public prefix of tokens
MAX_TOKEN_TEXT = 256
NO_TENANT_ID = "00000000-0000-0000-0000-000000000000"
"""An id no tenant has (tenant ids are random UUIDs): what an unauthenticated request naming an unknown
tenant is resolved with, so that it finds nothing and gets the answer a known tenant's unknown resource gets
(tenant names are not to be learnt by probing)."""
SEEN_TTL_SECONDS = 1.0


@dataclass(frozen=True)
class TenantInfo:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class TokenInfo:
    id: str
    tenant: str
    name: str
    role: str
    created_at: datetime
    revoked: bool
    person: str = ""
    created_by: str | None = None
    expires_at: datetime | None = None


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for aware columns; every time here is UTC."""
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, repr=False)
class NewToken:
    info: TokenInfo
    secret: str  # shown once

    def __repr__(self) -> str:
        return f"NewToken({self.info.id})"


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Tenants:
    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        self._seen: TtlCache[bytes, tuple[Principal, str, datetime | None]] = TtlCache(SEEN_TTL_SECONDS)
        self._ids: TtlCache[str, str] = TtlCache(60.0)  # tenant name -> id: neither ever changes

    # -- tenants -----------------------------------------------------------------------------
    def create(self, name: str, *, actor: Principal | None, first_admin: str = "admin") -> tuple[TenantInfo, NewToken]:
        """Create a tenant and its first admin token (returned once)."""
        check_name("tenant", name)
        tenant_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        try:
            with self.db.write() as conn:
                conn.execute(insert(Tenant).values(id=tenant_id, name=name, created_at=now))
                self.audit.ensure_head(conn, tenant_id)
                token = self._issue(
                    conn, tenant_id, name, first_admin, "admin", now, person=first_admin, created_by=None
                )
                actor_text = actor.describe() if actor else "init"
                self.audit.append(conn, tenant_id, actor=actor_text, action="tenant.create", target=f"tenant:{name}")
                self.audit.append(
                    conn,
                    tenant_id,
                    actor=actor_text,
                    action="token.create",
                    target=f"token:{token.info.id}",
                    details={"name": first_admin, "role": "admin", "person": first_admin},
                )
                if actor is not None:
                    self.audit.append(
                        conn,
                        actor.tenant_id,
                        actor=actor.describe(),
                        action="tenant.create",
                        target=f"tenant:{name}",
                    )
        except IntegrityError as exc:
            raise Conflict(f"tenant '{name}' exists already", code="tenant_exists") from exc
        return TenantInfo(tenant_id, name, now), token

    def list_tenants(self) -> list[TenantInfo]:
        with self.db.read() as conn:
            rows = conn.execute(select(Tenant.id, Tenant.name, Tenant.created_at).order_by(Tenant.name)).all()
        return [TenantInfo(r.id, r.name, r.created_at) for r in rows]

    def get(self, name: str) -> TenantInfo:
        with self.db.read() as conn:
            row = conn.execute(select(Tenant.id, Tenant.name, Tenant.created_at).where(Tenant.name == name)).first()
        if row is None:
            raise NotFound(f"no tenant '{name}'", code="tenant_not_found")
        return TenantInfo(row.id, row.name, row.created_at)

    def cached_id(self, name: str) -> str | None:
        return self._ids.get(name)

    def id_of(self, name: str) -> str:
        """The tenant's id (cached: the hot path of key release names tenants on every request)."""
        hit = self._ids.get(name)
        if hit is None:
            hit = self.get(name).id
            self._ids.put(name, hit)
        return hit

    def id_or_unknown(self, name: str) -> str:
        """The tenant's id, or :data:`NO_TENANT_ID` when there is no such tenant (for unauthenticated
        routes, which must answer an unknown tenant as they answer a known one's unknown resource)."""
        try:
            return self.id_of(name)
        except NotFound:
            return NO_TENANT_ID

    # -- tokens ------------------------------------------------------------------------------
    def _person_id(self, conn: Connection, tenant_id: str, person: str, now: datetime, created_by: str | None) -> str:
        """The id of the tenant's person ``person``, created now if new."""
        check_name("person", person)
        found = conn.execute(select(Person.id).where(Person.tenant_id == tenant_id, Person.name == person)).scalar()
        if found is not None:
            return str(found)
        person_id = str(uuid.uuid4())
        conn.execute(
            insert(Person).values(id=person_id, tenant_id=tenant_id, name=person, created_at=now, created_by=created_by)
        )
        return person_id

    def _issue(
        self,
        conn: Connection,
        tenant_id: str,
        tenant: str,
        name: str,
        role: str,
        now: datetime,
        *,
        person: str,
        created_by: str | None,
        expires_at: datetime | None = None,
    ) -> NewToken:
        check_name("token", name)
        if role not in HUMAN_ROLES:
            raise BadRequest(
                f"tokens are for people ({', '.join(HUMAN_ROLES)}); machines use certificates from 'ca issue'",
                code="bad_role",
            )
        token_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()
        secret = secrets.token_urlsafe(32)
        try:
            with conn.begin_nested():
                person_id = self._person_id(conn, tenant_id, person, now, created_by)
                conn.execute(
                    insert(ApiToken).values(
                        id=token_id,
                        tenant_id=tenant_id,
                        name=name,
                        role=role,
                        person_id=person_id,
                        created_by=created_by,
                        secret_hash=_hash(secret),
                        created_at=now,
                        expires_at=expires_at,
                    )
                )
        except IntegrityError as exc:
            raise Conflict(f"a token named '{name}' exists already", code="token_exists") from exc
        info = TokenInfo(token_id, tenant, name, role, now, False, person, created_by, expires_at)
        return NewToken(info, f"{TOKEN_PREFIX}{token_id}.{secret}")

    def create_token(
        self, actor: Principal, name: str, role: str, person: str | None = None, ttl_seconds: int | None = None
    ) -> NewToken:
        """A new token for ``person`` (by default a person named after the token), minted by ``actor``: the
        token records that ``actor``'s person saw its secret. With ``ttl_seconds`` it expires that long after
        now (the server's clock); without, it lives until revoked."""
        now = datetime.now(UTC)
        expires_at = now + timedelta(seconds=ttl_seconds) if ttl_seconds is not None else None
        with self.db.write() as conn:
            token = self._issue(
                conn,
                actor.tenant_id,
                actor.tenant,
                name,
                role,
                now,
                person=person or name,
                created_by=actor.person or None,
                expires_at=expires_at,
            )
            details = {"name": name, "role": role, "person": token.info.person}
            if expires_at is not None:
                details["expires_at"] = expires_at.isoformat()
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="token.create",
                target=f"token:{token.info.id}",
                details=details,
            )
        return token

    def bootstrap_system(self) -> NewToken:
        """At init: the system tenant and its root admin token."""
        _, token = self.create(SYSTEM_TENANT, actor=None, first_admin="root")
        return token

    def list_tokens(self, actor: Principal) -> list[TokenInfo]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(ApiToken, Person.name.label("person"))
                .join(Person, Person.id == ApiToken.person_id)
                .where(ApiToken.tenant_id == actor.tenant_id)
                .order_by(ApiToken.created_at)
            ).all()
        return [
            TokenInfo(
                r.id,
                actor.tenant,
                r.name,
                r.role,
                r.created_at,
                r.revoked_at is not None,
                r.person,
                r.created_by,
                _aware(r.expires_at),
            )
            for r in rows
        ]

    def revoke_token(self, actor: Principal, token_id: str) -> None:
        with self.db.write() as conn:
            result = conn.execute(
                update(ApiToken)
                .where(
                    ApiToken.tenant_id == actor.tenant_id,
                    ApiToken.id == token_id,
                    ApiToken.revoked_at.is_(None),
                )
                .values(revoked_at=datetime.now(UTC))
            )
            if result.rowcount != 1:
                raise NotFound(f"no live token '{token_id}'", code="token_not_found")
            self.audit.append(
                conn,
                actor.tenant_id,
                actor=actor.describe(),
                action="token.revoke",
                target=f"token:{token_id}",
            )
        self._seen.drop_where(lambda _digest, seen: seen[1] == token_id)

    def seen(self, text: str) -> Principal | None:
        """The principal of a token authenticated within the last second, without a database read."""
        hit = self._seen.get(hashlib.sha256(text.encode()).digest())
        if hit is None or (hit[2] is not None and hit[2] <= datetime.now(UTC)):
            return None  # an expired token is looked up (and refused) again
        return hit[0]

    def authenticate(self, text: str) -> Principal:
        """Resolve a bearer token to its principal; every failure reads the same to the caller.

        A token seen valid within the last second is not looked up again; revocation here drops it
        at once, revocation on another server within that second.
        """
        bad = Unauthenticated("the API token is not valid", code="bad_token")
        if len(text) > MAX_TOKEN_TEXT or not text.startswith(TOKEN_PREFIX) or "." not in text:
            raise bad
        seen = self.seen(text)
        if seen is not None:
            return seen
        digest = hashlib.sha256(text.encode()).digest()
        token_id, _, secret = text[len(TOKEN_PREFIX) :].partition(".")
        with self.db.read() as conn:
            row = conn.execute(
                select(
                    ApiToken.secret_hash,
                    ApiToken.role,
                    ApiToken.name,
                    ApiToken.revoked_at,
                    ApiToken.expires_at,
                    Tenant.id,
                    Tenant.name,
                    Person.name.label("person"),
                )
                .join(Tenant, Tenant.id == ApiToken.tenant_id)
                .join(Person, Person.id == ApiToken.person_id)
                .where(ApiToken.id == token_id)
            ).first()
        expected = row.secret_hash if row is not None else bytes(32)
        if not hmac.compare_digest(expected, _hash(secret)) or row is None or row.revoked_at is not None:
            raise bad
        expires_at = _aware(row.expires_at)
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise bad  # an expired token reads as any other bad token: its holder learns nothing more
        principal = Principal(
            tenant_id=row[5],
            tenant=row[6],
            role=row.role,
            name=row.name,
            kind="token",
            person=row.person,
            token_id=token_id,
        )
        self._seen.put(digest, (principal, token_id, expires_at))
        return principal
