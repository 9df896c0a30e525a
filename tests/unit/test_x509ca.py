"""Tenant CAs, machine client certificates and their verification (keysteward.crypto.x509ca)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keysteward.crypto import x509ca, x509identity
from keysteward.errors import BadRequest, Unauthenticated

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def ca_a() -> tuple[str, bytearray]:
    return x509ca.new_ca("tenant a")


@pytest.fixture(scope="module")
def ca_b() -> tuple[str, bytearray]:
    return x509ca.new_ca("tenant b")


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _der(pem: str) -> bytes:
    return _cert(pem).public_bytes(serialization.Encoding.DER)


def _agent(
    ca: tuple[str, bytearray],
    tenant: str = "a",
    name: str = "vm-1",
    *,
    csr_pem: bytes | None = None,
    days: int = 365,
) -> x509ca.IssuedCert:
    return x509ca.issue_client_cert(
        ca[0], ca[1], tenant=tenant, role=x509identity.ROLE_AGENT, name=name, csr_pem=csr_pem, days=days
    )


def _hand_issued(ca: tuple[str, bytearray], *, sans: list[x509.GeneralName], eku: x509.ObjectIdentifier) -> bytes:
    """A leaf signed by ``ca`` with whatever SANs and EKU the test needs."""
    ca_cert = _cert(ca[0])
    ca_key = serialization.load_pem_private_key(bytes(ca[1]), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------- CA


def test_new_ca_profile(ca_a: tuple[str, bytearray]) -> None:
    cert_pem, key_pem = ca_a
    cert = _cert(cert_pem)
    assert isinstance(key_pem, bytearray)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(bytes(key_pem), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"  # see new_ca: speed
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.verify_directly_issued_by(cert)
    x509ca.check_ca(cert_pem, key_pem)
    x509ca.check_ca(cert_pem, None)


def test_check_ca_rejects_a_leaf(ca_a: tuple[str, bytearray]) -> None:
    leaf = _agent(ca_a)
    with pytest.raises(BadRequest) as info:
        x509ca.check_ca(leaf.cert_pem, leaf.key_pem)
    assert info.value.code == "ca_not_a_ca"


def test_check_ca_rejects_a_mismatched_key(ca_a: tuple[str, bytearray], ca_b: tuple[str, bytearray]) -> None:
    with pytest.raises(BadRequest) as info:
        x509ca.check_ca(ca_a[0], ca_b[1])
    assert info.value.code == "ca_key_mismatch"


@pytest.mark.parametrize(
    "pem", ["", "not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "é"]
)
def test_check_ca_rejects_garbage(pem: str) -> None:
    with pytest.raises(BadRequest) as info:
        x509ca.check_ca(pem, None)
    assert info.value.code == "bad_pem"


def test_check_ca_rejects_two_certificates(ca_a: tuple[str, bytearray], ca_b: tuple[str, bytearray]) -> None:
    with pytest.raises(BadRequest) as info:
        x509ca.check_ca(ca_a[0] + ca_b[0], None)
    assert info.value.code == "bad_pem"


def test_check_ca_rejects_garbage_and_encrypted_keys(ca_a: tuple[str, bytearray]) -> None:
    with pytest.raises(BadRequest) as info:
        x509ca.check_ca(ca_a[0], b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert info.value.code == "bad_pem"
    key = serialization.load_pem_private_key(bytes(ca_a[1]), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(BadRequest) as info:
        x509ca.check_ca(ca_a[0], encrypted)
    assert info.value.code == "bad_pem"
    assert "encrypted" in info.value.message


def test_check_ca_rejects_an_expired_ca(ca_a: tuple[str, bytearray]) -> None:
    later = _cert(ca_a[0]).not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(BadRequest) as info:
        x509ca.check_ca(ca_a[0], None, now=later)
    assert info.value.code == "ca_expired"


def test_check_ca_accepts_a_customer_rsa_ca() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Customer Issuing CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    x509ca.check_ca(cert_pem, key_pem)
    issued = x509ca.issue_client_cert(cert_pem, key_pem, tenant="cust", role="host", name="h1")
    assert x509identity.verify_client_cert(_der(issued.cert_pem), cert_pem).role == "host"


def test_new_ca_rejects_bad_input() -> None:
    with pytest.raises(BadRequest):
        x509ca.new_ca("")
    with pytest.raises(BadRequest) as info:
        x509ca.new_ca("ok", days=0)
    assert info.value.code == "bad_validity"


# ---------------------------------------------------------------- client certificates


def test_issue_verify_round_trip(ca_a: tuple[str, bytearray]) -> None:
    issued = _agent(ca_a)
    assert issued.key_pem is not None and "PRIVATE" not in repr(issued)
    assert bytes(issued.key_pem) not in repr(issued).encode()
    cert = _cert(issued.cert_pem)
    assert format(cert.serial_number, "x") == issued.serial
    assert cert.not_valid_after_utc == issued.not_after
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "vm-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("keysteward:a/agent/vm-1")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    key = serialization.load_pem_private_key(bytes(issued.key_pem), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()

    ident = x509identity.verify_client_cert(_der(issued.cert_pem), ca_a[0])
    assert ident == x509identity.ClientIdentity(tenant="a", role="agent", name="vm-1", serial=issued.serial)
    assert ident.uri == "keysteward:a/agent/vm-1"
    assert x509identity.peek_identity(_der(issued.cert_pem)) == ident


def test_cert_from_tenant_a_against_tenant_b(ca_a: tuple[str, bytearray], ca_b: tuple[str, bytearray]) -> None:
    der = _der(_agent(ca_a).cert_pem)
    with pytest.raises(Unauthenticated) as info:
        x509identity.verify_client_cert(der, ca_b[0])
    assert info.value.code == "bad_client_cert"
    assert "not issued by this tenant's CA" in info.value.message


def test_cert_from_a_ca_with_the_same_name_is_rejected(ca_a: tuple[str, bytearray]) -> None:
    impostor = x509ca.new_ca("tenant a")  # same subject, other key
    der = _der(_agent(impostor).cert_pem)
    with pytest.raises(Unauthenticated) as info:
        x509identity.verify_client_cert(der, ca_a[0])
    assert "signature does not verify" in info.value.message


def test_expired_and_not_yet_valid(ca_a: tuple[str, bytearray]) -> None:
    issued = _agent(ca_a, days=1)
    der = _der(issued.cert_pem)
    with pytest.raises(Unauthenticated) as info:
        x509identity.verify_client_cert(der, ca_a[0], now=issued.not_after + dt.timedelta(seconds=1))
    assert info.value.code == "bad_client_cert" and "expired" in info.value.message
    with pytest.raises(Unauthenticated) as info:
        x509identity.verify_client_cert(der, ca_a[0], now=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    assert "not valid before" in info.value.message
    x509identity.verify_client_cert(der, ca_a[0], now=issued.not_after - dt.timedelta(minutes=1))


def test_leaf_never_outlives_its_ca() -> None:
    short_ca = x509ca.new_ca("short", days=10)
    issued = _agent(short_ca, days=365)
    assert issued.not_after <= _cert(short_ca[0]).not_valid_after_utc


def test_server_cert_is_not_a_client_cert(ca_a: tuple[str, bytearray]) -> None:
    server = x509ca.issue_server_cert(ca_a[0], ca_a[1], hostnames=["kms.example"], ips=["10.0.0.1"])
    with pytest.raises(Unauthenticated) as info:
        x509identity.verify_client_cert(_der(server.cert_pem), ca_a[0])
    assert info.value.code == "bad_client_cert"
    # the same, with an identity URI but EKU serverAuth: refused for its EKU
    der = _hand_issued(
        ca_a,
        sans=[x509.UniformResourceIdentifier("keysteward:a/agent/vm-1")],
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    assert x509identity.peek_identity(der).name == "vm-1"
    with pytest.raises(Unauthenticated) as info:
        x509identity.verify_client_cert(der, ca_a[0])
    assert "clientAuth" in info.value.message


def test_server_cert_profile(ca_a: tuple[str, bytearray]) -> None:
    server = x509ca.issue_server_cert(ca_a[0], ca_a[1], hostnames=["kms.example", "localhost"], ips=["::1"])
    cert = _cert(server.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["kms.example", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.key_pem is not None


@pytest.mark.parametrize(
    ("hostnames", "ips", "code"),
    [
        (["*.example"], [], "bad_hostname"),
        (["Upper.example"], [], "bad_hostname"),
        ([], ["10.0.0"], "bad_ip"),
        ([], [], "bad_hostname"),
    ],
)
def test_server_cert_rejects_bad_names(
    ca_a: tuple[str, bytearray], hostnames: list[str], ips: list[str], code: str
) -> None:
    with pytest.raises(BadRequest) as info:
        x509ca.issue_server_cert(ca_a[0], ca_a[1], hostnames=hostnames, ips=ips)
    assert info.value.code == code


def _csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    name: str = "vm-csr",
    uri: str = "keysteward:a/agent/vm-csr",
) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_csr_path(ca_a: tuple[str, bytearray], kind: str) -> None:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    )
    csr_pem = _csr(key).public_bytes(serialization.Encoding.PEM)
    issued = _agent(ca_a, name="vm-csr", csr_pem=csr_pem)
    assert issued.key_pem is None
    cert = _cert(issued.cert_pem)
    assert cert.public_key() == key.public_key()
    # only the public key is taken from the CSR: identity and subject are keysteward's
    ident = x509identity.verify_client_cert(_der(issued.cert_pem), ca_a[0])
    assert (ident.tenant, ident.role, ident.name) == ("a", "agent", "vm-csr")
    assert cert.subject.rfc4514_string() == "CN=vm-csr"


@pytest.mark.parametrize(
    ("name", "uri"),
    [("vm-csr", "keysteward:other/admin/root"), ("whatever the agent says", "keysteward:a/agent/vm-csr")],
)
def test_csr_asking_for_another_identity_is_refused(ca_a: tuple[str, bytearray], name: str, uri: str) -> None:
    csr_pem = _csr(ec.generate_private_key(ec.SECP256R1()), name, uri).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(BadRequest) as info:
        _agent(ca_a, name="vm-csr", csr_pem=csr_pem)
    assert info.value.code == "bad_csr"


def test_csr_with_broken_signature(ca_a: tuple[str, bytearray]) -> None:
    der = bytearray(_csr(ec.generate_private_key(ec.SECP256R1())).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s
    broken = x509.load_der_x509_csr(bytes(der))
    assert not broken.is_signature_valid
    with pytest.raises(BadRequest) as info:
        _agent(ca_a, csr_pem=broken.public_bytes(serialization.Encoding.PEM))
    assert info.value.code == "bad_csr"
    assert "signature" in info.value.message


def test_csr_garbage_and_weak_keys(ca_a: tuple[str, bytearray]) -> None:
    with pytest.raises(BadRequest) as info:
        _agent(ca_a, csr_pem=b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    assert info.value.code == "bad_csr"
    weak_key = rsa.generate_private_key(65537, 1024)  # noqa: S505 - deliberately too small
    weak = _csr(weak_key).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(BadRequest) as info:
        _agent(ca_a, csr_pem=weak)
    assert info.value.code == "bad_csr"


def test_issue_with_the_wrong_ca_key(ca_a: tuple[str, bytearray], ca_b: tuple[str, bytearray]) -> None:
    with pytest.raises(BadRequest) as info:
        x509ca.issue_client_cert(ca_a[0], ca_b[1], tenant="a", role="agent", name="x")
    assert info.value.code == "ca_key_mismatch"


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize(
    "bad", ["", "UPPER", "-lead", ".lead", "a/b", "a:b", "a b", "x" * 65, "x\n", "caf\u00e9", "a%2f"]
)
@pytest.mark.parametrize("where", ["tenant", "role", "name"])
def test_invalid_name_components(ca_a: tuple[str, bytearray], bad: str, where: str) -> None:
    parts = {"tenant": "a", "role": "agent", "name": "vm-1", where: bad}
    with pytest.raises(BadRequest) as info:
        x509identity.identity_uri(parts["tenant"], parts["role"], parts["name"])
    assert info.value.code == "bad_name"
    with pytest.raises(BadRequest):
        x509ca.issue_client_cert(ca_a[0], ca_a[1], tenant=parts["tenant"], role=parts["role"], name=parts["name"])


def test_valid_name_components() -> None:
    assert x509identity.identity_uri("acme-1", "host", "x" * 64) == "keysteward:acme-1/host/" + "x" * 64
    assert x509identity.identity_uri("0", "a.b_c-d", "9") == "keysteward:0/a.b_c-d/9"
    assert x509identity.IDENTITY_URI_PREFIX == x509identity.IDENTITY_URI_SCHEME + ":"


def test_peek_identity_without_uri_san(ca_a: tuple[str, bytearray]) -> None:
    der = _hand_issued(ca_a, sans=[x509.DNSName("vm-1.example")], eku=ExtendedKeyUsageOID.CLIENT_AUTH)
    with pytest.raises(Unauthenticated) as info:
        x509identity.peek_identity(der)
    assert info.value.code == "bad_client_cert"
    with pytest.raises(Unauthenticated):
        x509identity.verify_client_cert(der, ca_a[0])


@pytest.mark.parametrize(
    "uris",
    [
        ["keysteward:a/agent/vm-1", "keysteward:a/agent/vm-2"],  # two identities
        ["keysteward:a/agent"],  # malformed
        ["keysteward:a/agent/vm-1/x"],
        ["KEYSTEWARD:A/agent/vm-1"],
        ["spiffe://a/agent/vm-1"],  # someone else's identity scheme only
    ],
)
def test_peek_identity_needs_exactly_one_good_uri(ca_a: tuple[str, bytearray], uris: list[str]) -> None:
    der = _hand_issued(
        ca_a, sans=[x509.UniformResourceIdentifier(u) for u in uris], eku=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    with pytest.raises(Unauthenticated) as info:
        x509identity.peek_identity(der)
    assert info.value.code == "bad_client_cert"


def test_peek_identity_ignores_other_sans(ca_a: tuple[str, bytearray]) -> None:
    der = _hand_issued(
        ca_a,
        sans=[x509.DNSName("vm-1.example"), x509.UniformResourceIdentifier("keysteward:a/host/h-1")],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    assert x509identity.verify_client_cert(der, ca_a[0]).role == "host"


@pytest.mark.parametrize("der", [b"", b"\x30\x03\x02\x01\x00", b"garbage" * 10])
def test_garbage_client_cert(ca_a: tuple[str, bytearray], der: bytes) -> None:
    with pytest.raises(Unauthenticated) as info:
        x509identity.peek_identity(der)
    assert info.value.code == "bad_client_cert"
    with pytest.raises(Unauthenticated):
        x509identity.verify_client_cert(der, ca_a[0])


def test_unusable_tenant_ca_is_unauthenticated(ca_a: tuple[str, bytearray]) -> None:
    with pytest.raises(Unauthenticated) as info:
        x509identity.verify_client_cert(_der(_agent(ca_a).cert_pem), "not a pem")
    assert info.value.code == "bad_client_cert"


def test_pem_helpers_name_one_certificate(ca_a: tuple[str, bytearray]) -> None:
    cert = _cert(ca_a[0])
    assert x509identity.pem_to_der(ca_a[0]) == cert.public_bytes(serialization.Encoding.DER)
    assert x509identity.subject_of(ca_a[0]) == cert.subject
    assert len(x509identity.pem_fingerprint(ca_a[0])) == 64
    other_pem, _ = x509ca.new_ca("another CA")
    assert x509identity.pem_fingerprint(other_pem) != x509identity.pem_fingerprint(ca_a[0])
    for bad in ("", "not a pem", ca_a[0] + other_pem, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        for helper in (x509identity.pem_to_der, x509identity.subject_of, x509identity.pem_fingerprint):
            with pytest.raises(BadRequest) as info:
                helper(bad)
            assert info.value.code == "bad_pem"
