"""How an authenticated principal appears to the tenant's policy: its Cedar principal record.

A token is a ``Human`` (its role is an attribute and its group); a machine certificate is an ``Agent``, a
``Host`` or a ``Hypervisor`` (a KMIP client) by its role. Instances are not here: their evidence
names them (:mod:`keysteward.access.volume_actions`).
"""

from __future__ import annotations

from typing import Any

from keysteward.errors import Forbidden
from keysteward.identity.principal import Principal

_MACHINE_TYPES = {"agent": "Agent", "host": "Host", "hypervisor": "Hypervisor"}


def policy_principal(who: Principal) -> dict[str, Any]:
    """The ``principal`` of a :class:`~keysteward.policy.facts.PolicyRequest` for an authenticated caller."""
    if who.is_system:
        raise Forbidden("the system tenant's principals run the service; they never use tenant keys",
                        code="role_forbidden")  # fmt: skip
    if who.kind == "xks":  # a KMS's SigV4 credential uses keys only through the XKS actions (xks_actions.py)
        raise Forbidden("an XKS credential uses its store's external keys only", code="role_forbidden")
    if who.kind == "cert":
        kind = _MACHINE_TYPES.get(who.role)
        if kind is None:
            raise Forbidden(f"role '{who.role}' has no policy principal", code="role_forbidden")
        return {"type": kind, "name": who.name}
    return {"type": "Human", "name": who.name, "role": who.role, "groups": [who.role]}
