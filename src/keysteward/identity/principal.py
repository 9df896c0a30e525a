"""Who is calling: a principal, its roles and what each role may do."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from keysteward.errors import BadRequest, Forbidden

SYSTEM_TENANT = "system"
HUMAN_ROLES = ("admin", "security-officer", "auditor")
MACHINE_ROLES = ("agent", "host", "hypervisor")
ROLES = HUMAN_ROLES + MACHINE_ROLES
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_name(kind: str, value: str) -> str:
    if not NAME_RE.match(value or ""):
        raise BadRequest(
            f"{kind} name must be 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit",
            code="bad_name",
        )
    return value


class Permission(Enum):
    TENANT_MANAGE = "tenant.manage"
    SEAL_MANAGE = "seal.manage"
    KEY_MANAGE = "key.manage"
    KEY_READ = "key.read"
    KEY_USE = "key.use"
    TOKEN_MANAGE = "token.manage"  # noqa: S105 - a permission name
    CA_MANAGE = "ca.manage"
    CA_READ = "ca.read"
    CA_REVOKE = "ca.revoke"
    AUDIT_READ = "audit.read"
    VOLUME_MANAGE = "volume.manage"
    VOLUME_READ = "volume.read"
    VOLUME_REVOKE = "volume.revoke"
    POLICY_MANAGE = "policy.manage"
    POLICY_READ = "policy.read"
    APPROVAL_READ = "approval.read"
    APPROVAL_DECIDE = "approval.decide"
    ATTEST_MANAGE = "attest.manage"


_TENANT_GRANTS: dict[str, frozenset[Permission]] = {
    "admin": frozenset(
        {
            Permission.KEY_MANAGE,
            Permission.KEY_READ,
            Permission.KEY_USE,
            Permission.TOKEN_MANAGE,
            Permission.CA_MANAGE,
            Permission.CA_READ,
            Permission.CA_REVOKE,
            Permission.AUDIT_READ,
            Permission.VOLUME_MANAGE,
            Permission.VOLUME_READ,
            Permission.VOLUME_REVOKE,
            Permission.POLICY_MANAGE,
            Permission.POLICY_READ,
            Permission.APPROVAL_READ,
            Permission.APPROVAL_DECIDE,
            Permission.ATTEST_MANAGE,
        }
    ),
    "security-officer": frozenset(
        {
            Permission.KEY_READ,
            Permission.CA_READ,
            Permission.CA_REVOKE,
            Permission.AUDIT_READ,
            Permission.VOLUME_READ,
            Permission.VOLUME_REVOKE,
            Permission.POLICY_READ,
            Permission.APPROVAL_READ,
            Permission.APPROVAL_DECIDE,
        }
    ),
    "auditor": frozenset(
        {
            Permission.KEY_READ,
            Permission.CA_READ,
            Permission.AUDIT_READ,
            Permission.VOLUME_READ,
            Permission.POLICY_READ,
            Permission.APPROVAL_READ,
        }
    ),
    "agent": frozenset({Permission.KEY_USE}),
    "host": frozenset({Permission.KEY_USE}),
    "hypervisor": frozenset(),  # KMIP only: what it may do there, the tenant's policy says
}
# The system tenant's admins run the service (tenants, seal); they never use tenant keys.
_SYSTEM_GRANTS: dict[str, frozenset[Permission]] = {
    "admin": frozenset(
        {Permission.TENANT_MANAGE, Permission.SEAL_MANAGE, Permission.TOKEN_MANAGE, Permission.AUDIT_READ}
    ),
    "auditor": frozenset({Permission.AUDIT_READ}),
}


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant: str
    role: str
    name: str
    kind: str  # "token" or "cert"
    serial: str = ""
    """The client certificate's serial (hex) for a ``cert`` principal: what renewal and revocation name."""
    person: str = ""
    """The person a token belongs to (a name in the tenant); empty for machines (certificates)."""
    token_id: str = ""

    @property
    def is_system(self) -> bool:
        return self.tenant == SYSTEM_TENANT

    def describe(self) -> str:
        return f"{self.kind}:{self.tenant}/{self.role}/{self.name}"

    def may(self, permission: Permission) -> bool:
        grants = _SYSTEM_GRANTS if self.is_system else _TENANT_GRANTS
        return permission in grants.get(self.role, frozenset())

    def require(self, permission: Permission) -> None:
        if not self.may(permission):
            raise Forbidden(f"role '{self.role}' may not {permission.value}", code="role_forbidden")
