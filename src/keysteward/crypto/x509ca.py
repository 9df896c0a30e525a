"""Tenant certificate authorities and the machine identities they issue.

Every tenant has one CA. It issues client certificates to its machines (agents and hosts), each
naming exactly one identity as a URI subject alternative name::

    keysteward:<tenant>/<role>/<name>

and may issue the server's TLS certificate. A machine that connects over mutual TLS is identified
in two steps: :func:`peek_identity` reads the claimed identity without trusting it (to learn which
tenant's CA to check against), then :func:`verify_client_cert` proves that this tenant's CA issued
the certificate, that it is valid now, and that it is meant for client authentication.

Pure functions: PEM/DER in, objects out; no files, sockets or environment. Private keys come back
as ``bytearray`` so callers can wipe them (the transient ``bytes`` that pyca/cryptography returns
cannot be wiped; that copy is unavoidable). Every deliberate failure raises
:class:`~keysteward.errors.BadRequest` (bad input to an issuing operation) or
:class:`~keysteward.errors.Unauthenticated` (a client certificate that does not authenticate).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from keysteward.errors import BadRequest, Unauthenticated

__all__ = [
    "IDENTITY_URI_PREFIX",
    "IDENTITY_URI_SCHEME",
    "NAME_COMPONENT_PATTERN",
    "ROLE_AGENT",
    "ROLE_HOST",
    "ClientIdentity",
    "IssuedCert",
    "check_ca",
    "identity_uri",
    "issue_client_cert",
    "issue_server_cert",
    "new_ca",
    "peek_identity",
    "verify_client_cert",
]

IDENTITY_URI_SCHEME = "keysteward"
IDENTITY_URI_PREFIX = IDENTITY_URI_SCHEME + ":"
NAME_COMPONENT_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
ROLE_AGENT = "agent"
ROLE_HOST = "host"

_COMPONENT_RE = re.compile(NAME_COMPONENT_PATTERN)
_DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_DAYS = 36500
_BACKDATE = dt.timedelta(minutes=5)  # tolerate clock skew between issuer and verifier
_MIN_RSA_BITS = 2048
_SignHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512
_EC_CURVES: dict[str, _SignHash] = {
    "secp256r1": hashes.SHA256(),
    "secp384r1": hashes.SHA384(),
    "secp521r1": hashes.SHA512(),
}

_CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class IssuedCert:
    """A freshly issued certificate; ``key_pem`` is set only when keysteward generated the key."""

    cert_pem: str
    key_pem: bytearray | None = field(repr=False, compare=False)
    serial: str
    not_after: dt.datetime


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


# ---------------------------------------------------------------------------- identities


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


# ---------------------------------------------------------------------------- helpers


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= _MAX_DAYS:
        raise BadRequest(f"validity must be 1 to {_MAX_DAYS} days, got {days!r}", code="bad_validity")


def _load_cert_pem(pem: str, what: str) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, AttributeError) as exc:
        raise BadRequest(f"{what} is not a PEM certificate", code="bad_pem") from exc
    if len(certs) != 1:
        raise BadRequest(f"{what}: expected exactly one PEM certificate, got {len(certs)}", code="bad_pem")
    return certs[0]


def _load_ca_key(key_pem: bytes | bytearray) -> _CaKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise BadRequest(
            "the CA private key is encrypted; give it unencrypted (PKCS#8 or traditional PEM)",
            code="bad_pem",
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadRequest("the CA private key is not a readable PEM private key", code="bad_pem") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise BadRequest(
            "unsupported CA key type: use ECDSA (P-256, P-384, P-521) or RSA (2048 bits or more)",
            code="ca_unsupported_key",
        )
    _check_key_strength(key.public_key(), "CA key", code="ca_unsupported_key")
    return key


def _check_key_strength(key: _LeafPublicKey, what: str, *, code: str) -> None:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise BadRequest(f"{what}: RSA key of {key.key_size} bits is too small (minimum 2048)", code=code)
    elif key.curve.name not in _EC_CURVES:
        raise BadRequest(f"{what}: unsupported curve {key.curve.name} (use P-256, P-384 or P-521)", code=code)


def _is_self_signed_candidate(cert: x509.Certificate) -> bool:
    """Self-issued, and not marked as signed by another key (a key-rollover certificate)."""
    if cert.subject != cert.issuer:
        return False
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return True
    return aki.key_identifier is None or aki.key_identifier == ski.digest


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _sign_hash(key: _CaKey) -> _SignHash:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _EC_CURVES[key.curve.name]
    return hashes.SHA256()


def _spki(key: _LeafPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytearray:
    return bytearray(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _load_issuer(ca_cert_pem: str, ca_key_pem: bytes | bytearray) -> tuple[x509.Certificate, _CaKey]:
    ca = _load_cert_pem(ca_cert_pem, "CA certificate")
    key = _load_ca_key(ca_key_pem)
    ca_pub = ca.public_key()
    if not isinstance(ca_pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or _spki(ca_pub) != _spki(key.public_key()):
        raise BadRequest("the CA private key does not belong to the CA certificate", code="ca_key_mismatch")
    return ca, key


def _issue(
    ca: x509.Certificate,
    ca_key: _CaKey,
    *,
    subject: x509.Name,
    public_key: _LeafPublicKey,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    days: int,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    ca_not_after = ca.not_valid_after_utc
    if ca_not_after <= now:
        raise BadRequest(f"the CA certificate expired at {ca_not_after.isoformat()}", code="ca_expired")
    not_after = min(now + dt.timedelta(days=days), ca_not_after)  # never outlive the issuer
    not_before = max(now - _BACKDATE, ca.not_valid_before_utc)
    try:
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.sign(ca_key, _sign_hash(ca_key))


def _issued(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> IssuedCert:
    return IssuedCert(
        cert_pem=_pem(cert),
        key_pem=_key_pem(key) if key is not None else None,
        serial=_serial_hex(cert),
        not_after=cert.not_valid_after_utc,
    )


# ---------------------------------------------------------------------------- CAs


def new_ca(common_name: str, *, days: int = 3650) -> tuple[str, bytearray]:
    """A new self-signed tenant CA (ECDSA P-384, pathlen 0): ``(cert_pem, key_pem)``.

    The key is unencrypted PKCS#8 PEM in a ``bytearray`` for the caller to wrap and then wipe.
    """
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= 64 or not common_name.isprintable():
        raise BadRequest("CA common name must be 1-64 printable characters", code="bad_name")
    _check_days(days)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return _pem(cert), _key_pem(key)


def check_ca(cert_pem: str, key_pem: bytes | bytearray | None, *, now: dt.datetime | None = None) -> None:
    """Check a customer's own CA before ``ca import``; raises BadRequest saying what is wrong.

    Codes: ``bad_pem`` (not exactly one readable certificate, unreadable or encrypted key),
    ``ca_not_a_ca`` (no CA basic constraints, or key usage without keyCertSign), ``ca_expired`` /
    ``ca_not_yet_valid``, ``ca_bad_signature`` (a self-issued certificate whose signature does not
    verify), ``ca_unsupported_key``, ``ca_key_mismatch``, ``ca_unusable`` (with a key: a trial
    client certificate from this CA does not pass :func:`verify_client_cert`).
    The CA may be an intermediate of the customer's PKI: keysteward trusts it as an anchor.
    """
    ca = _load_cert_pem(cert_pem, "CA certificate")
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        bc = None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise BadRequest(f"CA certificate extensions do not parse: {exc}", code="bad_pem") from exc
    if bc is None or not bc.value.ca:
        raise BadRequest(
            "the certificate is not a CA (basicConstraints CA:TRUE is missing); give the CA, not a leaf",
            code="ca_not_a_ca",
        )
    try:
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise BadRequest("the CA certificate's key usage does not allow keyCertSign", code="ca_not_a_ca")
    # RFC 5280 path validation (verify_client_cert) insists on these two; say so now, not at first use.
    if not bc.critical:
        raise BadRequest("the CA certificate's basicConstraints extension must be critical", code="ca_unusable")
    if ku is None:
        raise BadRequest("the CA certificate has no key usage extension (keyCertSign needed)", code="ca_unusable")
    when = _now(now)
    if ca.not_valid_after_utc <= when:
        raise BadRequest(f"the CA certificate expired at {ca.not_valid_after_utc.isoformat()}", code="ca_expired")
    if ca.not_valid_before_utc > when:
        raise BadRequest(
            f"the CA certificate is not valid before {ca.not_valid_before_utc.isoformat()}",
            code="ca_not_yet_valid",
        )
    ca_pub = ca.public_key()
    if not isinstance(ca_pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise BadRequest(
            "unsupported CA key type: use ECDSA (P-256, P-384, P-521) or RSA (2048 bits or more)",
            code="ca_unsupported_key",
        )
    _check_key_strength(ca_pub, "CA certificate", code="ca_unsupported_key")
    if _is_self_signed_candidate(ca):
        try:
            ca.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise BadRequest(
                "the self-signed CA certificate's signature does not verify", code="ca_bad_signature"
            ) from exc
    if key_pem is None:
        return
    ca, key = _load_issuer(cert_pem, key_pem)
    trial_key = ec.generate_private_key(ec.SECP256R1())
    trial = _issue(
        ca,
        key,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "check")]),
        public_key=trial_key.public_key(),
        sans=[x509.UniformResourceIdentifier(identity_uri("check", ROLE_AGENT, "check"))],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=1,
    )
    try:
        verify_client_cert(trial.public_bytes(serialization.Encoding.DER), cert_pem)
    except Unauthenticated as exc:
        raise BadRequest(f"certificates issued by this CA would not verify: {exc.message}", code="ca_unusable") from exc


# ---------------------------------------------------------------------------- issuing


def issue_client_cert(
    ca_cert_pem: str,
    ca_key_pem: bytes | bytearray,
    *,
    tenant: str,
    role: str,
    name: str,
    csr_pem: bytes | None = None,
    days: int = 365,
) -> IssuedCert:
    """A client certificate for ``keysteward:<tenant>/<role>/<name>`` (EKU clientAuth, CN=name).

    With ``csr_pem`` the CSR's signature must verify (else BadRequest ``bad_csr``) and only its
    public key is used: its subject and requested extensions are ignored. Without it a P-256 key
    is generated and returned in ``key_pem``. The validity never extends past the CA's.
    """
    uri = identity_uri(tenant, role, name)
    _check_days(days)
    ca, ca_key = _load_issuer(ca_cert_pem, ca_key_pem)
    new_key: ec.EllipticCurvePrivateKey | None = None
    public_key: _LeafPublicKey
    if csr_pem is None:
        new_key = ec.generate_private_key(ec.SECP256R1())
        public_key = new_key.public_key()
    else:
        try:
            csr = x509.load_pem_x509_csr(bytes(csr_pem))
            signature_ok = csr.is_signature_valid
            csr_key = csr.public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise BadRequest("the CSR is not a readable PEM certificate request", code="bad_csr") from exc
        if not signature_ok:
            raise BadRequest("the CSR's signature does not verify with its own public key", code="bad_csr")
        if not isinstance(csr_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise BadRequest(
                "unsupported CSR key type: use ECDSA (P-256, P-384, P-521) or RSA (2048 bits or more)",
                code="bad_csr",
            )
        _check_key_strength(csr_key, "CSR", code="bad_csr")
        public_key = csr_key
    cert = _issue(
        ca,
        ca_key,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
        public_key=public_key,
        sans=[x509.UniformResourceIdentifier(uri)],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
    )
    return _issued(cert, new_key)


def issue_server_cert(
    ca_cert_pem: str,
    ca_key_pem: bytes | bytearray,
    *,
    hostnames: list[str],
    ips: list[str],
    days: int = 825,
) -> IssuedCert:
    """The server's TLS certificate (EKU serverAuth, SAN DNS + IP, new P-256 key)."""
    _check_days(days)
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        labels = host.split(".") if isinstance(host, str) else []
        if not labels or len(host) > 253 or any(_DNS_LABEL_RE.fullmatch(label) is None for label in labels):
            raise BadRequest(f"invalid hostname {host!r}: lowercase DNS labels only, no wildcards", code="bad_hostname")
        sans.append(x509.DNSName(host))
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise BadRequest(f"invalid IP address {ip!r}", code="bad_ip") from exc
    if not sans:
        raise BadRequest("a server certificate needs at least one hostname or IP address", code="bad_hostname")
    ca, ca_key = _load_issuer(ca_cert_pem, ca_key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    cn = hostnames[0] if hostnames else ips[0]
    cert = _issue(
        ca,
        ca_key,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
        public_key=key.public_key(),
        sans=sans,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        days=days,
    )
    return _issued(cert, key)


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
