"""Certificate signing requests: made on the machine that will hold the key, read by the tenant CA.

:func:`make_csr` makes a P-256 key pair and a CSR for one identity (the key never leaves that machine);
:func:`csr_public_key` reads a CSR for the CA: bounded, its signature verified with its own key, a
supported key type, and asking for nothing more than the identity being issued (no CA basic constraint,
no common name or SAN URI of another machine or tenant), else :class:`~keysteward.errors.BadRequest`
``bad_csr`` (``csr_too_large`` over :data:`MAX_CSR_BYTES`). Pure functions.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from keysteward.crypto.x509identity import identity_uri
from keysteward.errors import BadRequest

MAX_CSR_BYTES = 16 * 1024


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytearray:
    """A private key as unencrypted PKCS#8 PEM, in a buffer the caller can wipe."""
    return bytearray(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_csr(tenant: str, role: str, name: str) -> tuple[bytearray, bytes]:
    """A P-256 key pair made here and a CSR for ``keysteward:<tenant>/<role>/<name>``: (key PEM to keep
    0600 and wipe, CSR PEM to send). The key never leaves the machine that asks."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity_uri(tenant, role, name))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def csr_public_key(csr_pem: bytes, name: str, uri: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public key of a CSR for the identity ``uri`` (machine ``name``), checked as the module says."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise BadRequest(f"the CSR is larger than {MAX_CSR_BYTES} bytes", code="csr_too_large")
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
    _check_claims(csr, name, uri)
    return csr_key


def _check_claims(csr: x509.CertificateSigningRequest, name: str, uri: str) -> None:
    """A CSR that asks for more than the identity being issued is refused, not silently narrowed: a CA
    basic constraint, a common name or SAN URI naming another machine or tenant."""
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise BadRequest("the CSR's extensions do not parse", code="bad_csr") from exc
    for ext in extensions:
        if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            raise BadRequest("the CSR asks for a CA certificate: machines get leaf certificates", code="bad_csr")
        if isinstance(ext.value, x509.SubjectAlternativeName):
            for asked in ext.value.get_values_for_type(x509.UniformResourceIdentifier):
                if asked != uri:
                    raise BadRequest("the CSR's SAN names another identity than the one issued", code="bad_csr")
    for attribute in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if attribute.value != name:
            raise BadRequest("the CSR's common name names another machine than the one issued", code="bad_csr")
