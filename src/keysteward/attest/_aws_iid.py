"""AWS-shaped instance identity documents: JSON signed by a DER PKCS#7 SignedData, RSA PKCS#1 v1.5 SHA-256.

The SignedData is read by :mod:`keysteward.formats.cms_signed_data` (a strict walk over asn1crypto's
low-level BER/DER parser) and checked here (one signer, SHA-256, RSA, the content equal to the document,
the messageDigest of the signed attributes); the signature itself is verified by pyca/cryptography
against each registered certificate. The document is parsed only after its signature verified.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keysteward.attest._common import VerifiedClaims, b64_field, no_certificate_verifies, not_valid_now
from keysteward.attest._fields import ident, nonce_field, timestamp
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.providers import ProviderTrust
from keysteward.formats.cms_signed_data import (
    CONTENT_TYPE,
    DATA,
    MESSAGE_DIGEST,
    NotSignedData,
    RawValue,
    SignedAttributes,
    oid,
    parse_signed_data,
)

MAX_DOCUMENT: Final = 16 * 1024
MAX_SIGNATURE: Final = 16 * 1024
_SHA256: Final = oid("2.16.840.1.101.3.4.2.1")
_RSA_SHA256: Final = frozenset({oid("1.2.840.113549.1.1.1"), oid("1.2.840.113549.1.1.11")})  # or sha256WithRSA
_OID_VALUE: Final = (0, 0, 6)  # (class, constructed, tag) of a RawValue: universal primitive OBJECT IDENTIFIER
_OCTET_STRING_VALUE: Final = (0, 0, 4)  # universal primitive OCTET STRING
_PARSE_ERRORS: Final = (ValueError, TypeError)  # CmsError is a ValueError
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
    try:
        sd = parse_signed_data(der)
    except NotSignedData as exc:
        raise EvidenceRejected("the signature is not a PKCS#7 SignedData") from exc
    if sd.digest_algorithms != (_SHA256,):
        raise EvidenceRejected("the signature must use SHA-256 (and no other digest)")
    if sd.content_type != DATA:
        raise EvidenceRejected("the signed content is not of type data")
    if sd.content is not None and not hmac.compare_digest(sd.content, document):
        raise EvidenceRejected("the document is not the one the signature covers")
    if len(sd.signer_infos) != 1:
        raise EvidenceRejected("the signature must have exactly one signer")
    si = sd.signer_infos[0]
    if si.digest_algorithm != _SHA256:
        raise EvidenceRejected("the signer must use SHA-256")
    if si.signature_algorithm not in _RSA_SHA256:
        raise EvidenceRejected("the signer must use RSA PKCS#1 v1.5 with SHA-256")
    if si.signed_attributes is None:
        return _Signed(document, si.signature)
    _check_signed_attributes(si.signed_attributes, document)
    return _Signed(si.signed_attributes.signed_bytes, si.signature)  # RFC 5652 5.4: the DER with the SET tag


def _check_signed_attributes(attrs: SignedAttributes, document: bytes) -> None:
    found: dict[bytes, list[RawValue]] = {}
    for attr_type, values in attrs.attributes:
        found.setdefault(attr_type, []).extend(values)
    content_types = found.get(CONTENT_TYPE, [])
    digests = found.get(MESSAGE_DIGEST, [])
    if len(content_types) != 1 or content_types[0] != (*_OID_VALUE, DATA):
        raise EvidenceRejected("the signed attributes must hold one content type, data")
    if len(digests) != 1 or digests[0][:3] != _OCTET_STRING_VALUE:
        raise EvidenceRejected("the signed attributes must hold one message digest")
    if not hmac.compare_digest(digests[0][3], hashlib.sha256(document).digest()):
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
