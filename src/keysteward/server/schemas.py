"""The API's request and response bodies (pydantic v2). Binary values travel as standard base64."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from keysteward.errors import BadRequest


def _b64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64") from exc
    return value


B64 = Annotated[str, Field(max_length=16384), AfterValidator(_b64)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Context = Annotated[dict[str, Annotated[str, Field(max_length=1024)]], Field(max_length=64)]


def unb64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("not valid base64", code="bad_base64") from exc


def b64(value: bytes | bytearray) -> str:
    return base64.b64encode(value).decode()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnsealRequest(Strict):
    share: str = Field(min_length=1, max_length=1024)


class UnsealResetRequest(Strict):
    share: str | None = Field(default=None, min_length=1, max_length=1024)


class SealStatus(Strict):
    initialized: bool
    sealed: bool
    seal_type: str
    insecure: bool
    warning: str | None = None
    threshold: int
    progress: int
    cluster_id: str
    version: str
    share_commitments: bool = False  # shares checked one by one; false only on an old cluster not yet unsealed


class TenantCreate(Strict):
    name: Name
    first_admin: Name = "admin"


class TenantOut(Strict):
    id: str
    name: str
    created_at: datetime


MAX_TOKEN_TTL_SECONDS = 10 * 366 * 86400
"""The longest ``token create --ttl``: ten years (a token without a TTL lives until it is revoked)."""


class TokenCreate(Strict):
    name: Name
    role: Annotated[str, Field(pattern=r"^(admin|security-officer|auditor)$")]
    person: Name | None = None  # whose token it is; a new person named after the token when not given
    ttl_seconds: Annotated[int, Field(ge=1, le=MAX_TOKEN_TTL_SECONDS)] | None = None  # None: until revoked


class TokenOut(Strict):
    id: str
    tenant: str
    name: str
    role: str
    created_at: datetime
    revoked: bool
    person: str
    created_by: str | None = None
    expires_at: datetime | None = None
    token: str | None = None


class TenantCreated(Strict):
    tenant: TenantOut
    admin_token: TokenOut


class WhoAmI(Strict):
    tenant: str
    role: str
    name: str
    kind: str
    person: str | None = None


class KeyCreate(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    description: str = Field(default="", max_length=1024)


class VersionOut(Strict):
    version: int
    state: str
    created_at: datetime
    destroyed_at: datetime | None
    data_keys: int


class KeyOut(Strict):
    id: str
    name: str
    description: str
    state: str
    primary_version: int
    created_at: datetime
    versions: list[VersionOut] = []
    rotation: dict[str, object] | None = None


class DestroyVersion(Strict):
    force: bool = False


class DataKeyCreate(Strict):
    name: Name


class DataKeyOut(Strict):
    id: str
    name: str
    key: str
    kek_version: int
    created_at: datetime
    shredded: bool


class GenerateDataKey(Strict):
    key_spec: Annotated[str, Field(pattern=r"^(AES_256|AES_128)$")] = "AES_256"
    context: Context | None = None


class DataKeyPairOut(Strict):
    key: str
    version: int
    plaintext: str
    ciphertext: str


class EncryptRequest(Strict):
    plaintext: B64
    context: Context | None = None


class CiphertextOut(Strict):
    key: str
    version: int
    ciphertext: str


class DecryptRequest(Strict):
    ciphertext: B64
    context: Context | None = None


class PlaintextOut(Strict):
    key: str
    version: int
    plaintext: str


class ReEncryptRequest(Strict):
    ciphertext: B64
    context: Context | None = None
    destination_key: Name | None = None
    destination_context: Context | None = None


class CaImport(Strict):
    cert_pem: str = Field(min_length=1, max_length=65536)
    key_pem: str | None = Field(default=None, max_length=65536)


class CaOut(Strict):
    cert_pem: str
    can_issue: bool
    previous_pem: str | None = None
    """During a rotation: the replaced CA, still trusted until ``ca rotate --retire``."""


class CertIssue(Strict):
    name: Name
    role: Annotated[str, Field(pattern=r"^(agent|host|hypervisor)$")]
    csr_pem: str | None = Field(default=None, max_length=65536)
    days: int = Field(default=90, ge=1, le=90)


class CertRenew(Strict):
    csr_pem: str = Field(min_length=1, max_length=65536)
    days: int = Field(default=90, ge=1, le=90)


class CertRevoke(Strict):
    target: str = Field(min_length=1, max_length=200)
    """A serial (hex) or ROLE:NAME (``host:proxy-1``)."""
    reason: str = Field(default="", max_length=500)


class CertRevokeOut(Strict):
    target: str
    revoked: list[str]


class RevocationListOut(Strict):
    tenant: str
    revoked_serials: list[str]
    retired_cas: list[str]
    max_age_seconds: float


class CertOut(Strict):
    cert_pem: str
    key_pem: str | None
    serial: str
    not_after: datetime
    ca_pem: str


class AuditLinkOut(Strict):
    tenant_id: str
    seq: int
    body: str
    hash: str
    signature: str | None


class AuditPage(Strict):
    tenant: str
    tenant_id: str
    public_key: str
    records: list[AuditLinkOut]
