"""Bodies of the migration routes (docs/hosts.md, Migration)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

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


class SwitchoverIn(Strict):
    lease_id: Uuid
    token: B64
