"""What a front-end hands the access service, and what it gets back.

An :class:`AccessRequest` names the tenant, the principal as the front-end authenticated it (or None when
the evidence is what names the caller, as for an instance's release), the action, the resource (kind and
id), the evidence, the request context and how the result is delivered. The action's own inputs (the
plaintext of an encrypt, the one-time public key of a release) travel in ``inputs``, a frozen dataclass of
the action's handler.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keysteward.identity.principal import Principal


class Delivery(StrEnum):
    SEALED = "sealed"
    """The key sealed (HPKE) to a one-time key of the requester: volume release and registration."""
    CHANNEL = "channel"
    """The key in the authenticated channel (a KMIP Get over mutual TLS)."""
    OPERATION = "operation"
    """An operation done on the caller's behalf; only its result leaves (encrypt, decrypt)."""
    NOTHING = "nothing"
    """A state change; no key material leaves (revoke, destroy, lease renewal and end)."""


@dataclass(frozen=True)
class Resource:
    kind: str
    """A resource kind of the Cedar schema: ``Volume``, ``Key``, ``Tenant``, ``Lease``."""
    id: str
    """Its id as the front-end knows it (a name, a uuid, a ciphertext's key id); the handler resolves it."""


@dataclass(frozen=True)
class RequestContext:
    source: str = ""
    """The caller's network address as the listener saw it ('' when unknown)."""
    front_end: str = "rest"
    """Which listener took the request (``rest``, ``nbd``, ``kmip``, ``xks``): for the audit record."""
    request_id: str | None = None
    """The caller's own request id, where its protocol has one (XKS, KMIP), for the audit record."""

    def address(self) -> str | None:
        """``source`` as an IP address for the policy's ``context.request.source_ip``, or None."""
        return _address(self.source) if self.source else None


@functools.lru_cache(maxsize=4096)
def _address(source: str) -> str | None:
    try:
        return str(ipaddress.ip_address(source))
    except ValueError:
        return None


@dataclass(frozen=True, repr=False)
class AccessRequest:
    tenant: str
    action: str
    resource: Resource
    delivery: Delivery
    principal: Principal | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    context: RequestContext = field(default_factory=RequestContext)
    inputs: Any = None

    def __repr__(self) -> str:  # inputs may carry plaintext: never in a repr
        return f"AccessRequest({self.tenant}, {self.action}, {self.resource.kind}:{self.resource.id[:64]})"
