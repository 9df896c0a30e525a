"""A self-signed client certificate an admin pins (KMIP trust mode C): what makes one acceptable.

vCenter's *Make KMS trust vCenter → vCenter certificate* hands the key server a self-signed certificate. It
is trusted as exactly itself (the SHA-256 of its DER), never as an issuer: the listener accepts a handshake
with it, and the pin lookup by fingerprint is what names the machine. Pure: PEM in, facts out.

A certificate is pinnable when it is one PEM certificate, self-signed (its issuer is its subject and its own
key verifies its signature), valid now, and meant for client authentication: an Extended Key Usage, if it
has one, names clientAuth, and a Key Usage, if it has one, allows digitalSignature. Anything else is
:class:`~keysteward.errors.BadRequest` ``bad_client_cert``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from keysteward.errors import BadRequest

MAX_PEM = 64 * 1024
MAX_SUBJECT = 255


@dataclass(frozen=True)
class PinnableCert:
    pem: str
    fingerprint: str
    """SHA-256 of the DER, lower-case hex."""
    subject: str
    not_after: datetime


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="bad_client_cert")


def check_pinnable(pem: str, now: datetime) -> PinnableCert:
    """The facts of ``pem`` if it may be pinned; BadRequest otherwise (nothing stored)."""
    if len(pem) > MAX_PEM:
        raise _bad("the certificate is larger than 64 KiB")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise _bad("the file is not a PEM certificate") from exc
    if len(certs) != 1:
        raise _bad(f"expected exactly one PEM certificate, got {len(certs)}")
    cert = certs[0]
    if cert.issuer != cert.subject:
        raise _bad("the certificate is not self-signed: have keysteward sign a CSR instead ('ca sign-csr')")
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise _bad("the certificate's signature does not verify with its own key") from exc
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise _bad("the certificate is not valid now (expired or not yet valid)")
    _check_usage(cert)
    der = cert.public_bytes(serialization.Encoding.DER)
    return PinnableCert(
        pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        fingerprint=fingerprint(der),
        subject=cert.subject.rfc4514_string()[:MAX_SUBJECT],
        not_after=cert.not_valid_after_utc,
    )


def _check_usage(cert: x509.Certificate) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise _bad("the certificate's Extended Key Usage does not allow client authentication (clientAuth)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.digital_signature:
        raise _bad("the certificate's Key Usage does not allow digitalSignature (a TLS client signs)")


def valid_at(not_after: datetime, now: datetime | None = None) -> bool:
    end = not_after if not_after.tzinfo else not_after.replace(tzinfo=UTC)
    return (now or datetime.now(UTC)) <= end
