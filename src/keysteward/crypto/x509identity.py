"""Machine identities in client certificates: the identity URI, and checking a certificate against a tenant CA.

A machine that connects over mutual TLS is identified in two steps: :func:`peek_identity` reads the
claimed identity without trusting it (to learn which tenant's CA to check against), then
:func:`verify_client_cert` proves that this tenant's CA issued the certificate, that it is valid now,
and that it is meant for client authentication. Each certificate names exactly one identity as a URI
subject alternative name::

    keysteward:<tenant>/<role>/<name>

Pure functions: DER/PEM in, objects out. Every failure to authenticate raises
:class:`~keysteward.errors.Unauthenticated` with code ``bad_client_cert``; issuing lives in
:mod:`keysteward.crypto.x509ca`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from keysteward.errors import BadRequest, Unauthenticated

__all__ = [
    "IDENTITY_URI_PREFIX",
    "IDENTITY_URI_SCHEME",
    "NAME_COMPONENT_PATTERN",
    "ROLE_AGENT",
    "ROLE_HOST",
    "ClientIdentity",
    "identity_uri",
    "peek_identity",
    "pem_fingerprint",
    "pem_to_der",
    "subject_of",
    "verify_client_cert",
]

IDENTITY_URI_SCHEME = "keysteward"
IDENTITY_URI_PREFIX = IDENTITY_URI_SCHEME + ":"
NAME_COMPONENT_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
ROLE_AGENT = "agent"
ROLE_HOST = "host"

_COMPONENT_RE = re.compile(NAME_COMPONENT_PATTERN)


@dataclass(frozen=True)
class ClientIdentity:
    """Who a client certificate names: ``keysteward:<tenant>/<role>/<name>``."""

    tenant: str
    role: str
    name: str
    serial: str

    @property
    def uri(self) -> str:
        return identity_uri(self.tenant, self.role, self.name)


def _check_component(kind: str, value: str) -> None:
    if not isinstance(value, str) or _COMPONENT_RE.fullmatch(value) is None:
        raise BadRequest(
            f"invalid {kind} {value!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit",
            code="bad_name",
        )


def identity_uri(tenant: str, role: str, name: str) -> str:
    """The SAN URI of a machine identity; raises BadRequest (``bad_name``) on an invalid component."""
    _check_component("tenant", tenant)
    _check_component("role", role)
    _check_component("name", name)
    return f"{IDENTITY_URI_PREFIX}{tenant}/{role}/{name}"


def _parse_identity_uri(uri: str) -> tuple[str, str, str] | None:
    if not uri.startswith(IDENTITY_URI_PREFIX):
        return None
    parts = uri[len(IDENTITY_URI_PREFIX) :].split("/")
    if len(parts) != 3 or any(_COMPONENT_RE.fullmatch(p) is None for p in parts):
        return None
    return parts[0], parts[1], parts[2]


def _serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _load_cert_pem(pem: str, what: str) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, AttributeError) as exc:
        raise BadRequest(f"{what} is not a PEM certificate", code="bad_pem") from exc
    if len(certs) != 1:
        raise BadRequest(f"{what}: expected exactly one PEM certificate, got {len(certs)}", code="bad_pem")
    return certs[0]


def pem_fingerprint(pem: str) -> str:
    """SHA-256 (hex) of one PEM certificate's DER: how a tenant's CAs are told apart."""
    der = _load_cert_pem(pem, "certificate").public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def pem_to_der(pem: str) -> bytes:
    """One PEM certificate as DER (BadRequest ``bad_pem`` if it is not exactly one)."""
    return _load_cert_pem(pem, "certificate").public_bytes(serialization.Encoding.DER)


def subject_of(pem: str) -> x509.Name:
    """The subject name of one PEM certificate (a CA: the issuer name of what it issued)."""
    return _load_cert_pem(pem, "certificate").subject


# ---------------------------------------------------------------------------- verifying


def _unauth(message: str) -> Unauthenticated:
    return Unauthenticated(message, code="bad_client_cert")


def _load_leaf(cert_der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(bytes(cert_der))
    except (ValueError, TypeError) as exc:
        raise _unauth("the client certificate does not parse as DER X.509") from exc


def _identity_of(cert: x509.Certificate) -> ClientIdentity:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound as exc:
        raise _unauth("the client certificate has no subject alternative names (no keysteward identity)") from exc
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise _unauth("the client certificate's extensions do not parse") from exc
    ours = [u for u in uris if u.lower().startswith(IDENTITY_URI_PREFIX)]
    if len(ours) != 1:
        raise _unauth(
            f"the client certificate must name exactly one {IDENTITY_URI_PREFIX}<tenant>/<role>/<name> "
            f"identity URI, it names {len(ours)}"
        )
    parsed = _parse_identity_uri(ours[0])
    if parsed is None:
        raise _unauth(f"malformed keysteward identity URI {ours[0]!r}")
    tenant, role, name = parsed
    return ClientIdentity(tenant=tenant, role=role, name=name, serial=_serial_hex(cert))


def peek_identity(cert_der: bytes) -> ClientIdentity:
    """The identity a client certificate claims, NOT verified: only to pick the CA to verify against."""
    return _identity_of(_load_leaf(cert_der))


def verify_client_cert(cert_der: bytes, ca_cert_pem: str, *, now: dt.datetime | None = None) -> ClientIdentity:
    """Verify that ``ca_cert_pem`` issued this client certificate directly and return its identity.

    Checks: exactly one keysteward identity URI; issued and signed by this CA (no intermediates);
    leaf and CA valid at ``now``; EKU clientAuth; then the full RFC 5280 path validation of
    ``cryptography.x509.verification`` with the CA as the only trust anchor. The caller must still
    check that the identity's tenant is the tenant whose CA this is. Every failure raises
    Unauthenticated (``bad_client_cert``) saying what is wrong.
    """
    leaf = _load_leaf(cert_der)
    identity = _identity_of(leaf)
    try:
        ca = _load_cert_pem(ca_cert_pem, "tenant CA certificate")
    except BadRequest as exc:
        raise _unauth(f"this tenant's CA certificate is unusable: {exc.message}") from exc
    when = _now(now)

    if leaf.issuer != ca.subject:
        raise _unauth(
            f"the client certificate was not issued by this tenant's CA (its issuer is {leaf.issuer.rfc4514_string()})"
        )
    try:
        leaf.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise _unauth("the client certificate was not issued by this tenant's CA (signature does not verify)") from exc
    if leaf.not_valid_after_utc < when:
        raise _unauth(f"the client certificate expired at {leaf.not_valid_after_utc.isoformat()}")
    if leaf.not_valid_before_utc > when:
        raise _unauth(f"the client certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
    if ca.not_valid_after_utc < when:
        raise _unauth(f"this tenant's CA certificate expired at {ca.not_valid_after_utc.isoformat()}")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise _unauth("the certificate is not for client authentication (extended key usage lacks clientAuth)")

    verifier = PolicyBuilder().store(Store([ca])).time(when).max_chain_depth(0).build_client_verifier()
    try:
        verifier.verify(leaf, [])
    except VerificationError as exc:
        raise _unauth(f"the client certificate failed path validation against this tenant's CA: {exc}") from exc
    return identity
