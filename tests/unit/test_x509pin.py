"""What may be pinned as a KMIP client (trust mode C): one self-signed certificate, valid, for client auth."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keysteward.crypto.x509pin import MAX_PEM, check_pinnable, fingerprint, valid_at
from keysteward.errors import BadRequest
from tests.support.selfsigned import CLIENT_AUTH, SERVER_AUTH, self_signed

pytestmark = pytest.mark.unit


def _now() -> dt.datetime:
    """Now, read when asked: a time read at import is minutes old when a long run reaches these tests."""
    return dt.datetime.now(dt.UTC)


def _refused(pem: str, says: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check_pinnable(pem, _now())
    assert caught.value.code == "bad_client_cert" and says in caught.value.message


def test_a_self_signed_client_certificate_is_pinnable(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "ok", eku=[CLIENT_AUTH, SERVER_AUTH])
    now = _now()
    pinned = check_pinnable(cert.read_text(), now)
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert pinned.fingerprint == fingerprint(der) and len(pinned.fingerprint) == 64
    assert pinned.subject == "CN=vcsa.example.com" and valid_at(pinned.not_after, now)
    assert not valid_at(pinned.not_after, now + dt.timedelta(days=2))
    no_eku, _ = self_signed(tmp_path, "no-eku")  # no Extended Key Usage at all: any use, client auth too
    assert check_pinnable(no_eku.read_text(), now).fingerprint != pinned.fingerprint


def test_what_is_not_pinnable(tmp_path: Path) -> None:
    _refused(self_signed(tmp_path, "server", eku=[SERVER_AUTH])[0].read_text(), "clientAuth")
    _refused(self_signed(tmp_path, "expired", seconds=-60)[0].read_text(), "not valid now")
    anchor = self_signed(tmp_path, "anchor", "ca", is_ca=True)
    _refused(self_signed(tmp_path, "leaf", issuer=anchor)[0].read_text(), "not self-signed")
    one = self_signed(tmp_path, "one")[0].read_text()
    _refused(one + one, "exactly one")
    _refused("", "not a PEM certificate")
    _refused("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM certificate")
    _refused("é" + one, "not a PEM certificate")
    _refused(one + " " * MAX_PEM, "64 KiB")
    _refused(_no_signature_usage(), "digitalSignature")
    _refused(_signed_by_another_key(), "own key")


def _builder(key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "vcsa")])
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=1))
        .not_valid_after(_now() + dt.timedelta(days=1))
    )  # fmt: skip


def _no_signature_usage() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=True,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)  # fmt: skip
    cert = _builder(key).add_extension(usage, critical=True).sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _signed_by_another_key() -> str:
    """Issuer = subject, but another key signed it: a forged 'self-signed' certificate."""
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    return _builder(key).sign(other, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
