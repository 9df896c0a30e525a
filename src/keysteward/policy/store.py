"""Each tenant's Cedar policy set: versioned in the database, changed only by admins, audited with its diff.

The highest version is the one in force. A set that does not compile is refused with the file, line and
column of the problem, and the set in force stays. A tenant that never stored a set runs on the built-in
set (:func:`default_sources`): the per-volume binding of the key release issue, written in Cedar.

Every set in force also holds the built-in role grants (``roles.cedar``: admins use keys and manage
volumes and policy, security officers revoke and approve) unless the tenant stored a file of that name,
which then replaces it. So storing a set for releases keeps the operators' rights, and a tenant narrows
them with a ``forbid`` beside them or with its own ``roles.cedar``.

A server trusts what it read for :data:`CACHE_SECONDS`, so a change reaches every server of a cluster
within that time; the server that made it sees it at once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Final

from sqlalchemy import Connection, func, insert, select

from keysteward.audit.log import AuditLog
from keysteward.errors import NotFound
from keysteward.identity.principal import Principal
from keysteward.policy.diff import diff
from keysteward.policy.engine import CompiledPolicySet
from keysteward.store.db import Database
from keysteward.store.models import PolicySet
from keysteward.ttlcache import TtlCache

CACHE_SECONDS: Final = 1.0
MAX_DIFF: Final = 60_000
MAX_COMPILED: Final = 256  # compiled sets kept by content digest (oldest dropped first)
DEFAULT_FILE: Final = "binding.cedar"
ROLES_FILE: Final = "roles.cedar"


def _builtin(name: str) -> str:
    return resources.files("keysteward.policy").joinpath(name).read_text(encoding="utf-8")


def default_sources() -> dict[str, str]:
    """The built-in set: a volume goes to the instances or the host its binding names (binding.cedar), and
    the role grants (roles.cedar)."""
    return {DEFAULT_FILE: _builtin(DEFAULT_FILE), ROLES_FILE: _builtin(ROLES_FILE)}


def in_force(stored: dict[str, str]) -> dict[str, str]:
    """The set that decides for a stored set: the stored files plus the built-in roles.cedar unless stored."""
    return stored if ROLES_FILE in stored else {**stored, ROLES_FILE: _builtin(ROLES_FILE)}


@dataclass(frozen=True)
class PolicyVersion:
    """One version of a tenant's set (version 0 is the built-in default, never stored)."""

    version: int
    sources: dict[str, str]
    digest: str
    created_by: str
    created_at: datetime | None
    compiled: CompiledPolicySet


def digest(sources: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()


class PolicyStore:
    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        self._cache: TtlCache[str, PolicyVersion] = TtlCache(CACHE_SECONDS, load=self._read_current)
        self._compiled: dict[str, CompiledPolicySet] = {}
        self._lock = threading.Lock()
        sources = default_sources()
        self._default = PolicyVersion(0, sources, digest(sources), "built-in", None, self._compile(sources))

    @property
    def default(self) -> PolicyVersion:
        return self._default

    def current(self, tenant_id: str, conn: Connection | None = None) -> PolicyVersion:
        """The set in force for ``tenant_id`` (cached for a second)."""
        cached = self._cache.get(tenant_id)
        if cached is not None:
            return cached
        if conn is None:
            with self.db.read() as read:
                found = self._load(read, tenant_id, None)
        else:
            found = self._load(conn, tenant_id, None)
        self._cache.put(tenant_id, found)
        return found

    def _read_current(self, tenant_id: str) -> PolicyVersion:
        """The cache's read ahead (keysteward.ttlcache)."""
        with self.db.read() as conn:
            return self._load(conn, tenant_id, None)

    def cached(self, tenant_id: str) -> PolicyVersion | None:
        return self._cache.get(tenant_id)

    def get(self, tenant_id: str, version: int) -> PolicyVersion:
        if version == 0:
            return self._default
        with self.db.read() as conn:
            return self._load(conn, tenant_id, version)

    def _load(self, conn: Connection, tenant_id: str, version: int | None) -> PolicyVersion:
        query = select(PolicySet).where(PolicySet.tenant_id == tenant_id)
        if version is None:
            query = query.order_by(PolicySet.version.desc()).limit(1)
        else:
            query = query.where(PolicySet.version == version)
        row = conn.execute(query).first()
        if row is None:
            if version is None:
                return self._default
            raise NotFound(f"no policy set version {version}", code="policy_version_not_found")
        sources = json.loads(row.sources)
        return PolicyVersion(
            row.version, sources, row.digest, row.created_by, row.created_at, self._compile(in_force(sources))
        )

    def _compile(self, sources: dict[str, str]) -> CompiledPolicySet:
        """Compile ``sources`` once per content (a 200-policy set takes ~50 ms): the one-second cache of the
        set in force would otherwise recompile it every second on every server."""
        key = digest(sources)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = CompiledPolicySet.compile(sources)
            with self._lock:
                if len(self._compiled) >= MAX_COMPILED:
                    self._compiled.pop(next(iter(self._compiled)))
                self._compiled[key] = compiled
        return compiled

    def history(self, tenant_id: str) -> list[dict[str, object]]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(PolicySet.version, PolicySet.digest, PolicySet.created_by, PolicySet.created_at)
                .where(PolicySet.tenant_id == tenant_id)
                .order_by(PolicySet.version)
            ).all()
        return [
            {"version": r.version, "digest": r.digest, "created_by": r.created_by, "created_at": r.created_at}
            for r in rows
        ]

    def compile_proposed(self, sources: dict[str, str]) -> CompiledPolicySet:
        """``sources`` compiled as they would be in force (with the built-in roles unless replaced): a bad
        set raises here, before anything is stored."""
        return self._compile(in_force(sources))

    def store(
        self, conn: Connection, actor: Principal, sources: dict[str, str], compiled: CompiledPolicySet, now: datetime
    ) -> tuple[PolicyVersion, dict[str, object]]:
        """The access path's ``policy.update`` bookkeeping, in its transaction: the next version stored.
        Returns it and the audit details (version, previous, digest, policies, diff). Call :meth:`stored`
        after the commit."""
        before = self._load(conn, actor.tenant_id, None)
        latest = conn.execute(
            select(func.max(PolicySet.version)).where(PolicySet.tenant_id == actor.tenant_id)
        ).scalar_one()
        version = int(latest or 0) + 1
        conn.execute(
            insert(PolicySet).values(
                tenant_id=actor.tenant_id,
                version=version,
                sources=json.dumps(sources, sort_keys=True),
                digest=digest(sources),
                created_by=actor.describe(),
                created_at=now,
            )
        )
        made = PolicyVersion(version, dict(sources), digest(sources), actor.describe(), now, compiled)
        changes = diff(before.sources, sources)
        details: dict[str, object] = {
            "version": version,
            "previous": before.version,
            "digest": digest(sources),
            "policies": list(compiled.ids),
            "diff": changes[:MAX_DIFF],
            "diff_truncated": len(changes) > MAX_DIFF,
        }
        return made, details

    def stored(self, tenant_id: str, version: PolicyVersion) -> None:
        """After the commit: this server uses the new version at once (others within CACHE_SECONDS)."""
        self._cache.put(tenant_id, version)

    def changed_by_since(self, conn: Connection, tenant_id: str, since: datetime) -> set[str]:
        """Who (``Principal.describe()``) stored a policy version of the tenant after ``since``."""
        rows = conn.execute(
            select(PolicySet.created_by).where(PolicySet.tenant_id == tenant_id, PolicySet.created_at > since)
        ).scalars()
        return set(rows)


SEPARATION: Final = timedelta(hours=1)
"""Whoever changed the policy within this time may not approve a release it holds."""
