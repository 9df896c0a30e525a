"""Instance identity evidence: a provider-signed document naming the account, instance and image.

Two shapes, as clouds give them to their instances (keysteward-release/1, ``evidence.identity``):

- ``{"type": "aws-iid", "document": <base64 JSON>, "signature": <base64 DER PKCS#7, RSA-SHA256>}``
- ``{"type": "gcp-jwt", "token": <compact JWS, RS256>}``

:func:`verify_identity` either returns the verified :class:`InstanceIdentity` or raises
:class:`~keysteward.attest.errors.EvidenceRejected` (``evidence_invalid`` or ``binding_mismatch``);
there is no "valid" flag to forget to look at. It is pure: the caller gives the time and the trusts.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from keysteward.attest._aws_iid import verify_aws
from keysteward.attest._common import VerifiedClaims
from keysteward.attest._gcp_jwt import verify_gcp
from keysteward.attest.binding import BINDING_SIZE
from keysteward.attest.errors import BINDING_MISMATCH, EvidenceRejected
from keysteward.attest.providers import KINDS, IdentityKind, ProviderTrust

__all__ = ["EvidenceRejected", "InstanceIdentity", "ProviderTrust", "verify_identity"]

_FIELDS: Final[dict[str, frozenset[str]]] = {
    "aws-iid": frozenset({"type", "document", "signature"}),
    "gcp-jwt": frozenset({"type", "token"}),
}
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class InstanceIdentity:
    """Who the evidence proves the caller is; every field comes from a verified signature."""

    provider: str
    kind: IdentityKind
    account: str
    instance_id: str
    image_id: str | None
    region: str
    zone: str
    launched_at: datetime | None

    def key(self) -> str:
        """``provider/account/instance_id``: the instance identity of leases and bindings."""
        return f"{self.provider}/{self.account}/{self.instance_id}"

    def claims(self) -> dict[str, str]:
        """The fields as strings, for audit records and policy (nothing secret is in them)."""
        out = {
            "provider": self.provider,
            "kind": self.kind,
            "account": self.account,
            "instance_id": self.instance_id,
            "region": self.region,
            "zone": self.zone,
        }
        if self.image_id is not None:
            out["image_id"] = self.image_id
        if self.launched_at is not None:
            out["launched_at"] = self.launched_at.isoformat()
        return out


def verify_identity(
    evidence: Mapping[str, Any],
    trusts: Sequence[ProviderTrust],
    *,
    binding: bytes,
    now: datetime,
    audience: str,
) -> InstanceIdentity:
    """Verify ``evidence.identity`` against the providers ``trusts`` and the request's ``binding``.

    ``now`` must be timezone-aware; ``audience`` is the key manager's audience for gcp-jwt tokens.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if len(binding) != BINDING_SIZE:
        raise ValueError("binding must be 32 bytes")
    if not isinstance(evidence, Mapping):
        raise EvidenceRejected("the identity evidence must be an object")
    kind = evidence.get("type")
    if not isinstance(kind, str) or kind not in KINDS:
        raise EvidenceRejected(f"unknown identity evidence type (expected one of {', '.join(KINDS)})")
    if set(evidence) != _FIELDS[kind]:
        raise EvidenceRejected(f"{kind} evidence has exactly the fields {', '.join(sorted(_FIELDS[kind]))}")
    of_kind = [t for t in trusts if t.kind == kind]
    if not of_kind:
        raise EvidenceRejected(f"no {kind} provider is registered for this tenant")
    fields = dict(evidence)
    claims: VerifiedClaims = (
        verify_aws(fields, of_kind, now) if kind == "aws-iid" else verify_gcp(fields, of_kind, audience, now)
    )
    expected = binding.hex()
    if not _HEX64.fullmatch(claims.nonce) or not hmac.compare_digest(claims.nonce.encode(), expected.encode()):
        raise EvidenceRejected(
            f"the {kind} evidence of instance {claims.instance_id!r} was made for another nonce or public key: "
            "ask for a new challenge and fetch fresh evidence for it",
            code=BINDING_MISMATCH,
        )
    return InstanceIdentity(
        provider=claims.trust.name,
        kind=claims.trust.kind,
        account=claims.account,
        instance_id=claims.instance_id,
        image_id=claims.image_id,
        region=claims.region,
        zone=claims.zone,
        launched_at=claims.launched_at,
    )
