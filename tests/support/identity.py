"""Helpers to make identity evidence the way a provider (or an attacker holding some key) would.

No pytest here; tests/unit/test_attest_identity.py and the integration tests build on these.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from keysteward.devcloud.provider import KEY_FILE, DevCloud


@dataclass(frozen=True)
class Signer:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def of(cls, cloud: DevCloud) -> Signer:
        key = serialization.load_pem_private_key((cloud.state / KEY_FILE).read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return cls(key, cloud.certificate)

    @classmethod
    def make(
        cls,
        name: str = "test signer",
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        bits: int = 2048,
    ) -> Signer:
        now = datetime.now(UTC)
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(days=1))
            .not_valid_after(not_after or now + timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def pkcs7(
        self,
        data: bytes,
        *,
        detached: bool = False,
        attributes: bool = True,
        digest: hashes.HashAlgorithm | None = None,
        pss: bool = False,
    ) -> bytes:
        options = [pkcs7.PKCS7Options.NoCerts, pkcs7.PKCS7Options.Binary]
        if detached:
            options.append(pkcs7.PKCS7Options.DetachedSignature)
        if not attributes:
            options.append(pkcs7.PKCS7Options.NoAttributes)
        pad = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH) if pss else padding.PKCS1v15()
        return (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(data)
            .add_signer(self.cert, self.key, digest or hashes.SHA256(), rsa_padding=pad)  # type: ignore[arg-type]
            .sign(serialization.Encoding.DER, options)
        )

    def jwt(self, claims: dict[str, Any], **headers: Any) -> str:
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers or None)


def aws_document(nonce_hex: str, **fields: Any) -> bytes:
    """An AWS-shaped document with plausible values; ``fields`` override (None removes a field)."""
    doc: dict[str, Any] = {
        "accountId": "123456789012",
        "availabilityZone": "dev-east-1a",
        "imageId": "ami-0123456789abcdef0",
        "instanceId": "i-0123456789abcdef0",
        "pendingTime": "2025-01-02T03:04:05Z",
        "region": "dev-east-1",
        "nonce": nonce_hex,
    }
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def aws_evidence(document: bytes, signature: bytes) -> dict[str, str]:
    return {
        "type": "aws-iid",
        "document": base64.b64encode(document).decode(),
        "signature": base64.b64encode(signature).decode(),
    }


def gcp_claims(nonce_hex: str, audience: str, now: datetime, **fields: Any) -> dict[str, Any]:
    iat = int(now.timestamp())
    claims: dict[str, Any] = {
        "aud": audience,
        "iat": iat,
        "exp": iat + 3600,
        "nonce": nonce_hex,
        "google": {
            "compute_engine": {
                "project_id": "acme-prod",
                "instance_id": "4567890123456789012",
                "zone": "europe-west1-b",
                "instance_creation_timestamp": iat - 600,
            }
        },
    }
    claims.update(fields)
    return {k: v for k, v in claims.items() if v is not None}


def new_cloud(path: Path) -> DevCloud:
    return DevCloud.init(path)
