"""What a volume request puts before the tenant's policy: stored volumes and volumes about to be made as
the ``resource``, and a release's whole request (its inputs from the front-end, and the facts they make)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keysteward.policy.facts import PolicyRequest
from keysteward.release.volumes import Caller, HostIdentity, VolumeInfo, VolumeSpec


def volume_resource(volume: VolumeInfo) -> dict[str, Any]:
    """A stored volume as the policy's ``resource``."""
    return {
        "type": "Volume",
        "id": volume.id,
        "name": volume.name,
        "key": volume.key,
        "labels": dict(volume.labels),
        "binding": volume.binding.as_dict(),
    }


def spec_resource(volume_id: str, spec: VolumeSpec) -> dict[str, Any]:
    """A volume being registered (its id chosen, nothing stored yet) as the policy's ``resource``."""
    return {
        "type": "Volume",
        "id": volume_id,
        "name": spec.name,
        "key": spec.key,
        "labels": dict(spec.labels),
        "binding": spec.binding.as_dict(),
    }


@dataclass(frozen=True, repr=False)
class ReleaseInputs:
    volume_id: str
    nonce: str
    suite: str
    public_key: bytes
    on_behalf_of: str | None = None
    """The human (name in the tenant) the instance says asked for this release: shown to approvers, never
    trusted."""
    requested_by: str | None = None
    """Set by the front-end when a person of the tenant proved they ask (their own API token came with the
    request): that person may not approve it, whichever of their tokens they vote with."""
    host: str | None = None
    """Set by the front-end when the caller proved itself with a ``host`` client certificate of the tenant;
    the certificate is then the identity evidence (the platform evidence still counts)."""


def policy_request(
    tenant: str, source: str | None, volume: VolumeInfo, caller: Caller, platform: Mapping[str, Any], now: datetime
) -> PolicyRequest:
    """The facts of one release for the tenant's policy (raises PolicyRequestInvalid on bad facts)."""
    principal: dict[str, Any]
    if isinstance(caller, HostIdentity):
        principal = {"type": "Host", "name": caller.name}
        identity: dict[str, Any] = {"provider": "host", "kind": "host", "account": tenant,
                                    "instance_id": caller.name}  # fmt: skip
    else:
        identity = caller.claims()
        principal = {"type": "Instance", **{k: v for k, v in identity.items() if k not in ("kind", "launched_at")}}
    return PolicyRequest(
        tenant=tenant,
        action="release",
        principal=principal,
        resource=volume_resource(volume),
        identity=identity,
        platform=dict(platform),
        time=now,
        source_ip=source,
    )
