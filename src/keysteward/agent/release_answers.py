"""What a release, renewal or registration answers (docs/release-protocol.md): plain records the agent's
client (:mod:`keysteward.agent.client`) builds from the key manager's JSON. Secrets sit in locked
:class:`~keysteward.crypto.secret.SecretBuffer` fields kept out of ``repr``; each record wipes its own.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keysteward.crypto.secret import SecretBuffer


@dataclass(frozen=True)
class Challenge:
    nonce: str
    """As sent (base64url)."""
    nonce_bytes: bytes
    expires_at: str
    suites: tuple[str, ...]


@dataclass
class Lease:
    """A live lease: its token is what renewals and the clean end present."""

    id: str
    expires_at: datetime
    renew_seconds: float
    lease_seconds: float
    grace_seconds: float | None
    token: SecretBuffer = field(repr=False)

    def token_b64(self) -> str:
        return base64.b64encode(self.token.view()).decode()

    def wipe(self) -> None:
        self.token.wipe()


@dataclass
class Released:
    """A released secret and its lease; :meth:`wipe` when done (the lease token too when the lease ends)."""

    tenant: str
    volume_id: str
    suite: str
    key_version: int
    secret: SecretBuffer = field(repr=False)
    lease: Lease

    def wipe(self) -> None:
        self.secret.wipe()
        self.lease.wipe()


@dataclass(frozen=True)
class Pending:
    request_id: str
    poll_after_seconds: float


@dataclass(frozen=True)
class Renewal:
    action: str
    expires_at: datetime | None


@dataclass
class Registered:
    """A volume the key manager created: its record, and its secret for writing the keyslot."""

    volume: dict[str, Any]
    secret: SecretBuffer = field(repr=False)

    @property
    def id(self) -> str:
        return str(self.volume["id"])
