"""AWS-shaped instance identity documents: JSON signed by a DER PKCS#7 SignedData, RSA PKCS#1 v1.5 SHA-256.

The SignedData is parsed with asn1crypto and checked field by field (one signer, SHA-256, RSA, the
content equal to the document, the messageDigest of the signed attributes); the signature itself is
verified by pyca/cryptography against each registered certificate. The document is parsed only
after its signature verified.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from asn1crypto import cms, core
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keysteward.attest._common import VerifiedClaims, b64_field, no_certificate_verifies, not_valid_now
from keysteward.attest._fields import ident, nonce_field, timestamp
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.providers import ProviderTrust

MAX_DOCUMENT: Final = 16 * 1024
MAX_SIGNATURE: Final = 16 * 1024
_RSA_SHA256: Final = frozenset({"rsassa_pkcs1v15", "sha256_rsa"})
_PARSE_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError, RecursionError)
_WHERE: Final = "the identity document"


@dataclass(frozen=True)
class _Signed:
    """What a signature covers and the signature, taken from a checked SignedData."""

    signed_bytes: bytes
    signature: bytes


def verify_aws(evidence: dict[str, object], trusts: Sequence[ProviderTrust], now: datetime) -> VerifiedClaims:
    document = b64_field(evidence.get("document"), "document", MAX_DOCUMENT)
    der = b64_field(evidence.get("signature"), "signature", MAX_SIGNATURE)
    signed = _signed_data(der, document)
    trust = _verifying_trust(signed, trusts, now)
    doc = _document(document)
    return VerifiedClaims(
        trust=trust,
        account=ident(doc, "accountId", where=_WHERE),
        instance_id=ident(doc, "instanceId", where=_WHERE),
        image_id=ident(doc, "imageId", where=_WHERE),
        region=ident(doc, "region", where=_WHERE),
        zone=ident(doc, "availabilityZone", where=_WHERE),
        launched_at=timestamp(doc.get("pendingTime"), "pendingTime", where=_WHERE),
        nonce=nonce_field(doc, where=_WHERE),
    )


def _signed_data(der: bytes, document: bytes) -> _Signed:
    try:
        return _check_signed_data(der, document)
    except EvidenceRejected:
        raise
    except _PARSE_ERRORS as exc:
        raise EvidenceRejected("the signature does not parse as a DER PKCS#7 SignedData") from exc


def _check_signed_data(der: bytes, document: bytes) -> _Signed:
    info = cms.ContentInfo.load(der, strict=True)
    if info["content_type"].native != "signed_data":
        raise EvidenceRejected("the signature is not a PKCS#7 SignedData")
    sd = info["content"]
    digests = [a["algorithm"].native for a in sd["digest_algorithms"]]
    if digests != ["sha256"]:
        raise EvidenceRejected("the signature must use SHA-256 (and no other digest)")
    encap = sd["encap_content_info"]
    if encap["content_type"].native != "data":
        raise EvidenceRejected("the signed content is not of type data")
    content = encap["content"]
    if not isinstance(content, core.Void):
        content_bytes = content.native
        if not isinstance(content_bytes, bytes) or not hmac.compare_digest(content_bytes, document):
            raise EvidenceRejected("the document is not the one the signature covers")
    signers = list(sd["signer_infos"])
    if len(signers) != 1:
        raise EvidenceRejected("the signature must have exactly one signer")
    si = signers[0]
    if si["digest_algorithm"]["algorithm"].native != "sha256":
        raise EvidenceRejected("the signer must use SHA-256")
    if si["signature_algorithm"]["algorithm"].native not in _RSA_SHA256:
        raise EvidenceRejected("the signer must use RSA PKCS#1 v1.5 with SHA-256")
    signature = si["signature"].native
    if not isinstance(signature, bytes):
        raise EvidenceRejected("the signer has no signature value")
    attrs = si["signed_attrs"]
    if isinstance(attrs, core.Void):
        return _Signed(document, signature)
    _check_signed_attributes(attrs, document)
    # RFC 5652 5.4: the signature covers the DER of the attributes with their SET tag, not the [0] tag
    encoded = attrs.dump()
    return _Signed(b"\x31" + encoded[1:], signature)


def _check_signed_attributes(attrs: Any, document: bytes) -> None:
    found: dict[str, list[Any]] = {}
    for attr in attrs:
        found.setdefault(attr["type"].native, []).extend(attr["values"])
    content_types = found.get("content_type", [])
    digests = found.get("message_digest", [])
    if len(content_types) != 1 or content_types[0].native != "data":
        raise EvidenceRejected("the signed attributes must hold one content type, data")
    if len(digests) != 1 or not isinstance(digests[0].native, bytes):
        raise EvidenceRejected("the signed attributes must hold one message digest")
    if not hmac.compare_digest(digests[0].native, hashlib.sha256(document).digest()):
        raise EvidenceRejected("the document does not match the digest it was signed with (altered document)")


def _verifying_trust(signed: _Signed, trusts: Sequence[ProviderTrust], now: datetime) -> ProviderTrust:
    outside_validity: EvidenceRejected | None = None
    for trust in trusts:
        for cert in trust.certificates:
            key = cert.public_key()
            if not isinstance(key, rsa.RSAPublicKey):
                continue
            try:
                key.verify(signed.signature, signed.signed_bytes, padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                continue
            rejection = not_valid_now(trust, cert, now)
            if rejection is None:
                return trust
            outside_validity = outside_validity or rejection
    raise outside_validity or no_certificate_verifies(trusts)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _document(document: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(document.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise EvidenceRejected("the identity document is not JSON (UTF-8, no duplicate keys)") from exc
    if not isinstance(doc, dict):
        raise EvidenceRejected("the identity document is not a JSON object")
    return doc
