"""What both identity verifiers share: bounded decoding, the verified claims, certificate checks."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.providers import ProviderTrust, certificate_valid_at, describe_certificate


@dataclass(frozen=True)
class VerifiedClaims:
    """Fields of a document whose signature verified with a certificate of ``trust``."""

    trust: ProviderTrust
    account: str
    instance_id: str
    image_id: str | None
    region: str
    zone: str
    launched_at: datetime | None
    nonce: str


def b64_field(value: object, field: str, limit: int) -> bytes:
    """Strict base64 of at most ``limit`` decoded bytes; the length is checked before decoding."""
    if not isinstance(value, str) or not value:
        raise EvidenceRejected(f"evidence field {field!r} must be a non-empty base64 string")
    if len(value) > (limit + 2) // 3 * 4:
        raise EvidenceRejected(f"evidence field {field!r} is larger than {limit} bytes")
    try:
        decoded = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise EvidenceRejected(f"evidence field {field!r} is not valid base64") from exc
    if len(decoded) > limit:
        raise EvidenceRejected(f"evidence field {field!r} is larger than {limit} bytes")
    return decoded


def provider_names(trusts: Sequence[ProviderTrust]) -> str:
    return ", ".join(repr(t.name) for t in trusts)


def not_valid_now(trust: ProviderTrust, cert: x509.Certificate, now: datetime) -> EvidenceRejected | None:
    """The rejection for a certificate outside its validity at ``now``, or None."""
    if certificate_valid_at(cert, now):
        return None
    return EvidenceRejected(
        f"the signature verifies with certificate {describe_certificate(cert)} of provider {trust.name!r}, "
        f"but that certificate is not valid at {now.isoformat()} (valid {cert.not_valid_before_utc.isoformat()} "
        f"to {cert.not_valid_after_utc.isoformat()}): register the provider's current certificate"
    )


def no_certificate_verifies(trusts: Sequence[ProviderTrust], what: str = "signature") -> EvidenceRejected:
    plural = "provider" if len(trusts) == 1 else "providers"
    return EvidenceRejected(f"the {what} does not verify with any certificate of {plural} {provider_names(trusts)}")
