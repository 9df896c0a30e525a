"""A registered volume, its binding, and who may ask for it: the types the release path decides over.

Pure data and checks; the registry (:mod:`keysteward.release.registry`) stores and loads them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keysteward.attest.identity import InstanceIdentity
from keysteward.errors import BadRequest
from keysteward.identity.principal import check_name

ACTIVE, REVOKED, SHRED, DESTROYED = "active", "revoked", "shred", "destroyed"
VOLUME, VM, VM_DISK = "volume", "vm", "vm-disk"
MAX_LABELS = 32
SECRET_SIZE = 32  # the keysteward keyslot's passphrase: random, so pbkdf2 at 1000 iterations is enough


@dataclass(frozen=True)
class HostIdentity:
    """A machine of the tenant (a hypervisor host, the NBD proxy) proven by its mTLS client certificate."""

    tenant: str
    name: str

    def key(self) -> str:
        """``host:NAME``: the holder of the host's leases, never equal to an instance's key."""
        return f"host:{self.name}"

    def claims(self) -> dict[str, str]:
        return {"host": self.name}


Caller = InstanceIdentity | HostIdentity


def actor_of(holder: str) -> str:
    """The audit name of a lease or AK holder: ``host:NAME`` and ``hypervisor:NAME`` as they are,
    ``instance:provider/account/id``."""
    return holder if holder.startswith(("host:", "hypervisor:")) else f"instance:{holder}"


_BINDING_FIELDS = ("provider", "account", "instance_id", "image_id", "host")


@dataclass(frozen=True)
class Binding:
    """Who may receive a volume's key by the built-in rule: instances of a provider and account (one
    instance, one image if set), or one host of the tenant. A tenant's Cedar policies may say more."""

    provider: str | None = None
    account: str | None = None
    instance_id: str | None = None
    image_id: str | None = None
    host: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Binding:
        unknown = set(raw) - set(_BINDING_FIELDS)
        if unknown:
            raise BadRequest(f"unknown binding field(s): {', '.join(sorted(unknown))[:200]}", code="bad_binding")
        values: dict[str, str | None] = {}
        for name in _BINDING_FIELDS:
            value = raw.get(name)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 128):
                raise BadRequest(f"binding.{name} must be a string of 1-128 characters", code="bad_binding")
            values[name] = value
        if values["host"] is not None:
            if any(values[n] is not None for n in _BINDING_FIELDS[:4]):
                raise BadRequest("a binding names either a host or instances, not both", code="bad_binding")
            check_name("host", values["host"])
        elif not values["provider"] or not values["account"]:
            raise BadRequest("a binding needs 'provider' and 'account', or 'host'", code="bad_binding")
        return cls(**values)

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def mismatch(self, caller: Caller) -> str | None:
        """The first bound attribute the caller does not have, or None when it matches."""
        if isinstance(caller, HostIdentity):
            return None if self.host == caller.name else "host"
        if self.host is not None:
            return "host"
        for name, want, have in (
            ("provider", self.provider, caller.provider),
            ("account", self.account, caller.account),
            ("instance_id", self.instance_id, caller.instance_id),
            ("image_id", self.image_id, caller.image_id),
        ):
            if want is not None and want != have:
                return name
        return None


@dataclass(frozen=True)
class VolumeInfo:
    id: str
    tenant_id: str
    name: str
    key: str
    key_version: int
    dek_id: str
    labels: dict[str, str]
    binding: Binding
    state: str
    lease_seconds: int
    renew_seconds: int
    grace_seconds: int | None
    created_at: datetime
    kind: str = VOLUME
    """``volume``, ``vm`` (a VM's key: :mod:`keysteward.release.vms`) or ``vm-disk`` (released with its VM only)."""


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    key: str
    labels: dict[str, str]
    binding: Binding
    lease_seconds: int
    renew_seconds: int
    grace_seconds: int | None

    def check(self) -> None:
        check_name("volume", self.name)
        if len(self.labels) > MAX_LABELS or any(not 0 < len(k) <= 64 or len(v) > 256 for k, v in self.labels.items()):
            raise BadRequest(f"at most {MAX_LABELS} labels, names 1-64 and values 0-256 characters", code="bad_labels")
        if not 5 <= self.lease_seconds <= 86400:
            raise BadRequest("lease_seconds must be between 5 and 86400", code="bad_lease")
        if not 1 <= self.renew_seconds <= self.lease_seconds // 2:
            raise BadRequest("renew_seconds must be at least 1 and at most half of lease_seconds", code="bad_lease")
        if self.grace_seconds is not None and not 0 <= self.grace_seconds <= self.lease_seconds:
            raise BadRequest("grace_seconds must be between 0 and lease_seconds (or null)", code="bad_lease")


def volume_info(row: Any, key_name: str | None = None, key_version: int | None = None) -> VolumeInfo:
    kind = getattr(row, "kind", None) or VOLUME
    return VolumeInfo(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        key=row.key_name if key_name is None else key_name,
        key_version=row.key_version if key_version is None else key_version,
        dek_id=row.dek_id,
        labels=json.loads(row.labels),
        binding=Binding() if kind == VM else Binding.parse(json.loads(row.binding)),
        state=row.state,
        lease_seconds=row.lease_seconds,
        renew_seconds=row.renew_seconds,
        grace_seconds=row.grace_seconds,
        created_at=row.created_at,
        kind=kind,
    )
