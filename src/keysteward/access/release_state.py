"""A volume release's state between the steps of the access path, and what its delivery hands back.

:class:`ReleaseState` is :class:`keysteward.access.volume_actions.VolumeRelease`'s (and its VM subclasses')
``Subject.state``; :class:`Released` is what a permitted release delivers.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keysteward.access.actions import Subject
from keysteward.access.resources import ReleaseInputs
from keysteward.formats.release_wire import TOKEN_SIZE
from keysteward.release import leases
from keysteward.release.volumes import Caller, VolumeInfo


@dataclass(frozen=True, repr=False)
class Released:
    suite: str
    sealed: bytes
    key_version: int
    lease: leases.LeaseInfo
    lease_seconds: int
    renew_seconds: int
    grace_seconds: int | None

    def __repr__(self) -> str:
        return f"Released(lease={self.lease.id}, version={self.key_version})"


@dataclass
class ReleaseState:
    """A release between its steps: what resolve proved and found, and what the transaction made of it."""

    inputs: ReleaseInputs
    tenant: str
    raw: bytes
    expires: datetime
    volume: VolumeInfo
    key_id: str
    wrapped: bytes | None
    caller: Caller
    lease_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    token: bytearray = field(default_factory=lambda: bytearray(os.urandom(TOKEN_SIZE)))
    granted: leases.LeaseInfo | None = None
    """The lease granted by check's own statement (PostgreSQL, a plain permit): book has nothing left to do."""
    facts_json: str | None = None
    """The policy request the lease is granted on, as the lease keeps it: made once, by check or book."""
    admitted: dict[str, Any] | None = None
    """The admission's arguments that :meth:`VolumeRelease.prefetch` made its statement with (its time among
    them): ``check`` reads the statement's rows with the same."""

    def lease_facts(self, subject: Subject) -> str:
        if self.facts_json is None:
            assert subject.facts is not None
            self.facts_json = json.dumps(subject.facts.to_json(), sort_keys=True)
        return self.facts_json
