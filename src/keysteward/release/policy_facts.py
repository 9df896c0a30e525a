"""What the tenant's policy sees of a release, and the denial an operator reads when it says no.

:func:`policy_request` turns the verified caller (instance or host), the volume and the platform facts
into the Cedar request of :mod:`keysteward.policy.facts`; :func:`policy_denial` names the rule that
refused (the built-in binding's ``not_bound`` keeps the key release protocol's reason code).
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import TYPE_CHECKING, Any

from keysteward.errors import Denied
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.store import PolicyVersion
from keysteward.release.registry import Caller, HostIdentity, VolumeInfo

if TYPE_CHECKING:
    from keysteward.release.service import ReleaseRequest


def policy_request(
    request: ReleaseRequest, volume: VolumeInfo, caller: Caller, platform: dict[str, Any], now: datetime
) -> PolicyRequest:
    """The facts of one release for the tenant's policy (raises PolicyRequestInvalid on bad facts)."""
    principal: dict[str, Any]
    if isinstance(caller, HostIdentity):
        principal = {"type": "Host", "name": caller.name}
        identity: dict[str, Any] = {"provider": "host", "kind": "host", "account": request.tenant,
                                    "instance_id": caller.name}  # fmt: skip
    else:
        identity = caller.claims()
        principal = {"type": "Instance", **{k: v for k, v in identity.items() if k not in ("kind", "launched_at")}}
    try:
        source = str(ipaddress.ip_address(request.source)) if request.source else None
    except ValueError:
        source = None
    return PolicyRequest(
        tenant=request.tenant,
        action="release",
        principal=principal,
        resource={
            "type": "Volume",
            "id": volume.id,
            "name": volume.name,
            "key": volume.key,
            "labels": dict(volume.labels),
            "binding": volume.binding.as_dict(),
        },
        identity=identity,
        platform=platform,
        time=now,
        source_ip=source,
    )


def policy_denial(policy: PolicyVersion, decision: PolicyDecision, volume: VolumeInfo, caller: Caller) -> Denied:
    """The denial an operator can act on: which rule, which policies."""
    if policy.version == 0 and decision.reason == "no_permit":
        mismatch = volume.binding.mismatch(caller) or "binding"
        return Denied(f"the instance does not match the volume's binding ({mismatch})", code="not_bound")
    named = ", ".join(decision.policies[:5]) or "none"
    if decision.reason == "forbidden_by_policy":
        return Denied(f"forbidden by policy version {policy.version} ({named})", code="forbidden_by_policy")
    if decision.reason == "policy_error":
        return Denied(f"the policy could not be evaluated: {'; '.join(decision.errors)[:300]}", code="policy_error")
    return Denied(f"no policy of version {policy.version} permits this release", code="no_permit")
