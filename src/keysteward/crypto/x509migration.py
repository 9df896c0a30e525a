"""Certificates for one live migration's TLS channel (docs/hosts.md, Migration).

Each end of a migration gets a certificate from the tenant CA over the public key of a CSR its host made:
the subject is ``CN=ks-migration-<migration id>-<end>`` and nothing else, it expires in minutes, and it
carries no keysteward identity URI (it cannot authenticate to the key manager). The destination's is a
TLS server certificate whose DNS name :func:`migration_hostname` the source checks; the source's a client
certificate, the only DN the destination's QEMU ``tls-authz`` accepts (:func:`migration_dn`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keysteward.crypto.x509ca import (
    IssuedCert,
    _check_key_strength,
    _issued,
    _key_usage,
    _load_issuer,
    _sign_hash,
)
from keysteward.crypto.x509csr import csr_public_key
from keysteward.errors import BadRequest

End = Literal["source", "destination"]
MAX_MINUTES: Final = 60
_BACKDATE: Final = dt.timedelta(minutes=1)


def _check(migration_id: str, end: str) -> None:
    try:
        uuid.UUID(migration_id)
    except ValueError:
        raise BadRequest("a migration id is a UUID", code="bad_migration") from None
    if end not in ("source", "destination"):
        raise BadRequest("a migration end is source or destination", code="bad_migration")


def migration_cn(migration_id: str, end: End) -> str:
    _check(migration_id, end)
    return f"ks-migration-{migration_id.lower()}-{end}"


def migration_dn(migration_id: str, end: End) -> str:
    """The certificate's DN as QEMU's ``authz-simple`` compares it (GnuTLS's RFC 4514 form)."""
    return f"CN={migration_cn(migration_id, end)}"


def migration_hostname(migration_id: str) -> str:
    """The destination certificate's DNS name, which the source's QEMU is told to expect."""
    return f"m-{uuid.UUID(migration_id).hex}.migration.keysteward"


def issue_migration_cert(
    ca_cert_pem: str, ca_key_pem: bytes | bytearray, *, migration_id: str, end: End, csr_pem: bytes, minutes: int
) -> IssuedCert:
    """The certificate of one end of a migration, over the CSR's key (its subject and extensions ignored)."""
    cn = migration_cn(migration_id, end)
    if not 1 <= minutes <= MAX_MINUTES:
        raise BadRequest(f"a migration certificate lives 1-{MAX_MINUTES} minutes", code="bad_migration")
    public_key = csr_public_key(csr_pem, cn, "")
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise BadRequest("unsupported CSR key", code="bad_csr")
    _check_key_strength(public_key, "CSR", code="bad_csr")
    ca, ca_key = _load_issuer(ca_cert_pem, ca_key_pem)
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(minutes=minutes), ca.not_valid_after_utc)
    if not_after <= now:
        raise BadRequest("the CA certificate expired", code="ca_expired")
    eku = ExtendedKeyUsageOID.SERVER_AUTH if end == "destination" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - _BACKDATE, ca.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # GnuTLS (QEMU) insists on key encipherment beside the signature in a critical key usage
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if end == "destination":
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(migration_hostname(migration_id))]), critical=False
        )
    return _issued(builder.sign(ca_key, _sign_hash(ca_key)), None)


def make_migration_csr(migration_id: str, end: End) -> tuple[bytearray, bytes]:
    """On the host: a P-256 key pair for this end and its CSR (key PEM to wipe, CSR PEM to send)."""
    from cryptography.hazmat.primitives import hashes, serialization

    from keysteward.crypto.x509csr import key_pem

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, migration_cn(migration_id, end))])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM)
