"""Per-migration certificates (crypto/x509migration.py): names, lifetime, and CSRs that ask for more."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keysteward.crypto import x509ca, x509csr
from keysteward.crypto.x509identity import identity_uri, verify_client_cert
from keysteward.crypto.x509migration import (
    issue_migration_cert,
    make_migration_csr,
    migration_dn,
    migration_hostname,
)
from keysteward.errors import BadRequest, Unauthenticated

MID = str(uuid.uuid4())
JUNK = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


@pytest.fixture(scope="module")
def ca() -> tuple[str, bytearray]:
    return x509ca.new_ca("acme CA")


def _csr(cn: str, uri: str | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if uri is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_each_end_gets_a_short_lived_certificate_named_for_this_migration(ca: tuple[str, bytearray]) -> None:
    for end, eku in (("source", ExtendedKeyUsageOID.CLIENT_AUTH), ("destination", ExtendedKeyUsageOID.SERVER_AUTH)):
        _, csr = make_migration_csr(MID, end)
        issued = issue_migration_cert(*ca, migration_id=MID, end=end, csr_pem=csr, minutes=10)
        cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
        assert cert.subject.rfc4514_string() == migration_dn(MID, end)
        assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=10)
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and usage.key_encipherment  # what GnuTLS in QEMU requires
        sans = [e for e in cert.extensions if isinstance(e.value, x509.SubjectAlternativeName)]
        if end == "destination":
            assert sans[0].value.get_values_for_type(x509.DNSName) == [migration_hostname(MID)]
        else:
            assert sans == []
        # no keysteward identity: a migration certificate never authenticates to the key manager
        with pytest.raises(Unauthenticated):
            verify_client_cert(cert.public_bytes(serialization.Encoding.DER), ca[0])


@pytest.mark.parametrize(
    ("migration_id", "end", "minutes"),
    [("not-a-uuid", "source", 10), (MID, "sideways", 10), (MID, "source", 0), (MID, "source", 61)],
)
def test_bad_names_and_lifetimes_are_refused(
    ca: tuple[str, bytearray], migration_id: str, end: str, minutes: int
) -> None:
    _, csr = make_migration_csr(MID, "source")
    with pytest.raises(BadRequest):
        issue_migration_cert(*ca, migration_id=migration_id, end=end, csr_pem=csr, minutes=minutes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "csr",
    [
        pytest.param(lambda: _csr(f"ks-migration-{MID}-destination"), id="the other end's name"),
        pytest.param(lambda: _csr(f"ks-migration-{uuid.uuid4()}-source"), id="another migration"),
        pytest.param(lambda: _csr(f"ks-migration-{MID}-source", identity_uri("acme", "host", "a")), id="identity"),
        pytest.param(lambda: x509csr.make_csr("acme", "host", "host-a")[1], id="a host's CSR"),
        pytest.param(
            lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", id="junk"
        ),
        pytest.param(lambda: b"x" * 20000, id="too large"),
    ],
)
def test_a_csr_asking_for_more_than_this_end_is_refused(ca: tuple[str, bytearray], csr: object) -> None:
    with pytest.raises(BadRequest):
        issue_migration_cert(*ca, migration_id=MID, end="source", csr_pem=csr(), minutes=5)  # type: ignore[operator]
