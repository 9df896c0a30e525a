"""What the key store reports: keys, their versions and data keys, as plain frozen records (no key material).

Kept apart from :mod:`keysteward.keys.keystore`, which unwraps keys, so that front-ends may name these
types without importing the module that holds key material.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class VersionInfo:
    version: int
    state: str
    created_at: datetime
    destroyed_at: datetime | None
    data_keys: int


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    description: str
    state: str
    primary_version: int
    created_at: datetime
    versions: list[VersionInfo] = field(default_factory=list)
    rotation: dict[str, object] | None = None


@dataclass(frozen=True)
class DataKeyInfo:
    id: str
    name: str
    key: str
    kek_version: int
    created_at: datetime
    shredded: bool


@dataclass(frozen=True)
class KeyRef:
    id: str
    name: str
    state: str
    primary_version: int
