"""Bodies of the key release protocol and the volume registry (docs/release-protocol.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import Field

from keysteward.server.schemas import B64, Name, Strict

EvidenceField = Annotated[str, Field(max_length=32768)]
Labels = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=256)]],
    Field(max_length=32),
]
Suite = Annotated[str, Field(pattern=r"^(x25519|mlkem768-x25519)$")]
Uuid = Annotated[str, Field(min_length=1, max_length=64)]


class ChallengeOut(Strict):
    protocol: str
    nonce: str
    expires_at: datetime
    suites: list[str]


class Evidence(Strict):
    identity: Annotated[dict[Annotated[str, Field(max_length=32)], EvidenceField], Field(max_length=8)]
    tpm: Annotated[dict[Annotated[str, Field(max_length=32)], Any], Field(max_length=8)] | None = None
    snp: Annotated[dict[Annotated[str, Field(max_length=32)], EvidenceField], Field(max_length=8)] | None = None


class ReleaseIn(Strict):
    protocol: Annotated[str, Field(pattern=r"^keysteward-release/1$")] = "keysteward-release/1"
    tenant: Name
    volume_id: Uuid
    nonce: Annotated[str, Field(min_length=1, max_length=64)]
    suite: Suite = "x25519"
    public_key: B64
    evidence: Evidence
    on_behalf_of: Name | None = None


class PendingOut(Strict):
    status: str = "pending"
    request_id: str
    expires_at: datetime
    poll_after_seconds: float
    approvers: list[dict[str, Any]]


class LeaseOut(Strict):
    id: str
    expires_at: datetime
    lease_seconds: int
    renew_seconds: int
    grace_seconds: int | None


class ReleasedOut(Strict):
    status: str = "released"
    suite: str
    sealed: str
    key_version: int
    lease: LeaseOut


class LeaseToken(Strict):
    token: B64


class RenewOut(Strict):
    action: str
    expires_at: datetime


class BindingIn(Strict):
    """Instances of ``provider`` and ``account`` (one instance, one image if set), or one ``host``."""

    provider: Name | None = None
    account: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    instance_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    image_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    host: Name | None = None


class VolumeCreate(Strict):
    name: Name
    key: Name
    labels: Labels = {}
    binding: BindingIn
    lease_seconds: Annotated[int, Field(ge=5, le=86400)] = 30
    renew_seconds: Annotated[int, Field(ge=1, le=43200)] = 10
    grace_seconds: Annotated[int, Field(ge=0, le=86400)] | None = None
    suite: Suite = "x25519"
    public_key: B64


class VolumeOut(Strict):
    id: str
    tenant: str
    name: str
    key: str
    key_version: int
    labels: dict[str, str]
    binding: dict[str, str]
    state: str
    lease_seconds: int
    renew_seconds: int
    grace_seconds: int | None
    created_at: datetime


class VolumeCreated(Strict):
    volume: VolumeOut
    suite: str
    sealed: str


class RevokeIn(Strict):
    shred: bool = False
    reason: Annotated[str, Field(max_length=500)] = ""


class DestroyIn(Strict):
    reason: Annotated[str, Field(max_length=500)] = ""


class InstanceRevokeIn(Strict):
    """An instance (``provider``, ``account``, ``instance_id``) or a ``host`` of the tenant."""

    provider: Name | None = None
    account: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    instance_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    host: Name | None = None
    shred: bool = False
    reason: Annotated[str, Field(max_length=500)] = ""


class LeaseInfoOut(Strict):
    id: str
    volume_id: str
    holder: str
    state: str
    created_at: datetime
    renewed_at: datetime
    expires_at: datetime


class InstanceOut(Strict):
    holder: str
    live_leases: int
    last_release_at: datetime | None
    revoked: bool
    shred: bool
    revoked_at: datetime | None
    reason: str


class ProviderIn(Strict):
    name: Name
    kind: Annotated[str, Field(pattern=r"^(aws-iid|gcp-jwt)$")]
    certificates_pem: Annotated[str, Field(min_length=1, max_length=65536)]
    audience: Annotated[str, Field(max_length=1024)] | None = None


class ProviderOut(Strict):
    name: str
    kind: str
    audience: str | None
    certificates: list[str]
