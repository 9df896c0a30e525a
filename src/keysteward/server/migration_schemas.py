"""Bodies of the migration routes (docs/hosts.md, Migration)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from keysteward.server.release_schemas import Uuid
from keysteward.server.schemas import B64, Name, Strict
from keysteward.server.vm_schemas import VmReleasedOut, VmReleaseIn

Csr = Annotated[str, Field(min_length=1, max_length=16384)]
Address = Annotated[str, Field(min_length=3, max_length=128, pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")]


class MigrateIn(Strict):
    """An operator's order: migrate the VM to ``host``. Only precopy over TLS; there is no postcopy switch."""

    host: Name


class MigrateReleaseIn(VmReleaseIn):
    csr_pem: Csr


class MigrateReleasedOut(VmReleasedOut):
    migration: str
    certificate_pem: str
    ca_pem: str
    source_dn: str
    hostname: str
    source: str
    expires_at: datetime | None


class ReadyIn(Strict):
    address: Address


class SourceIn(Strict):
    lease_id: Uuid
    token: B64
    csr_pem: Csr


class SourceOut(Strict):
    certificate_pem: str
    ca_pem: str
    address: str
    hostname: str
    destination: str


Bytes = Annotated[int, Field(strict=True, ge=0, le=1 << 50)]
"""A byte count of a migration: an integer (no bool, float or string), 0 to 1 PiB (a VM has at most 1 TiB)."""


class ProgressIn(Strict):
    """The source's progress report (``query-migrate``'s ``ram`` and ``downtime``); nothing decides on it."""

    status: Literal["setup", "active", "device", "pre-switchover", "completed"]
    transferred_bytes: Bytes
    remaining_bytes: Bytes
    total_bytes: Bytes
    downtime_ms: Annotated[int, Field(strict=True, ge=0, le=3_600_000)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.remaining_bytes > self.total_bytes:
            raise ValueError("remaining_bytes exceeds total_bytes")
        if self.downtime_ms is not None and self.status != "completed":
            raise ValueError("downtime_ms comes with status completed only")
        return self


class SwitchoverIn(Strict):
    lease_id: Uuid
    token: B64
