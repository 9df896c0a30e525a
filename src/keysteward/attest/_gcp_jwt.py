"""GCP-shaped instance identity tokens: a compact JWS, RS256 only, verified with PyJWT.

PyJWT checks the algorithm (RS256 only: no ``none``, no HMAC with a public key as secret), the
signature, the audience (a single string equal to the key manager's) and that ``exp`` and ``iat``
exist; the times are then checked here against the caller's ``now`` with 60 s of leeway, so the
verifier has no clock of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from keysteward.attest._common import VerifiedClaims, no_certificate_verifies, not_valid_now, provider_names
from keysteward.attest._fields import ident, nonce_field, optional_ident, timestamp
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.providers import ProviderTrust

MAX_TOKEN: Final = 16 * 1024
LEEWAY_SECONDS: Final = 60
_WHERE: Final = "the identity token"
_OPTIONS: Final[Any] = {
    "require": ["exp", "iat", "aud"],
    "verify_exp": False,
    "verify_iat": False,
    "verify_nbf": False,
    "strict_aud": True,
}


def verify_gcp(
    evidence: dict[str, object], trusts: Sequence[ProviderTrust], audience: str, now: datetime
) -> VerifiedClaims:
    token = evidence.get("token")
    if not isinstance(token, str) or not token:
        raise EvidenceRejected("evidence field 'token' must be a non-empty string")
    if len(token) > MAX_TOKEN:
        raise EvidenceRejected(f"the identity token is larger than {MAX_TOKEN} bytes")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise EvidenceRejected("the identity token does not parse as a compact JWS") from exc
    if header.get("alg") != "RS256":
        raise EvidenceRejected("the identity token must be signed with RS256")
    usable = [t for t in trusts if t.audience is None or t.audience == audience]
    if not usable:
        raise EvidenceRejected(
            f"provider(s) {provider_names(trusts)} are registered for another audience than this key manager's "
            f"({audience!r}): register them with audience {audience!r}"
        )
    trust, claims = _verified(token, usable, audience, now)
    _check_times(claims, now)
    google = claims.get("google")
    engine = google.get("compute_engine") if isinstance(google, Mapping) else None
    if not isinstance(engine, Mapping):
        raise EvidenceRejected("the identity token has no google.compute_engine claims (ask for format=full)")
    where = "the identity token's google.compute_engine"
    zone = ident(engine, "zone", where=where)
    region, dash, _ = zone.rpartition("-")
    if not dash or not region:
        raise EvidenceRejected(f"{where} field 'zone' does not end in '-<zone letter>'")
    return VerifiedClaims(
        trust=trust,
        account=ident(engine, "project_id", where=where),
        instance_id=ident(engine, "instance_id", where=where),
        image_id=optional_ident(engine, "image_id", where=where),
        region=region,
        zone=zone,
        launched_at=timestamp(engine.get("instance_creation_timestamp"), "instance_creation_timestamp", where=where),
        nonce=nonce_field(claims, where=_WHERE),
    )


def _verified(
    token: str, trusts: Sequence[ProviderTrust], audience: str, now: datetime
) -> tuple[ProviderTrust, dict[str, Any]]:
    outside_validity: EvidenceRejected | None = None
    for trust in trusts:
        for cert in trust.certificates:
            key = cert.public_key()
            if not isinstance(key, rsa.RSAPublicKey):
                continue
            try:
                claims = jwt.decode(token, key=key, algorithms=["RS256"], audience=audience, options=_OPTIONS)
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError as exc:
                raise EvidenceRejected(
                    f"the identity token of provider {trust.name!r} is for another audience (expected {audience!r})"
                ) from exc
            except jwt.MissingRequiredClaimError as exc:
                raise EvidenceRejected(f"the identity token has no {exc.claim!r} claim") from exc
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise EvidenceRejected("the identity token does not parse or is not an RS256 token") from exc
            rejection = not_valid_now(trust, cert, now)
            if rejection is None:
                return trust, claims
            outside_validity = outside_validity or rejection
    raise outside_validity or no_certificate_verifies(trusts, "identity token's signature")


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise EvidenceRejected(f"the identity token's {name!r} claim is not an integer time")
    return value


def _check_times(claims: Mapping[str, Any], now: datetime) -> None:
    at = now.timestamp()
    exp = _int_claim(claims, "exp")
    if at > exp + LEEWAY_SECONDS:
        raise EvidenceRejected("the identity token has expired: fetch a fresh one from the metadata service")
    if _int_claim(claims, "iat") > at + LEEWAY_SECONDS:
        raise EvidenceRejected("the identity token is issued in the future: check the clocks")
    if "nbf" in claims and _int_claim(claims, "nbf") > at + LEEWAY_SECONDS:
        raise EvidenceRejected("the identity token is not valid yet: check the clocks")
