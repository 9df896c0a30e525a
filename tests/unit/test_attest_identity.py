"""Instance identity evidence: round trips with the devcloud provider, and every way to forge it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keysteward.attest.binding import binding
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.identity import InstanceIdentity, ProviderTrust, verify_identity
from keysteward.devcloud.provider import DevCloud, Instance
from keysteward.errors import BadRequest
from tests.support.identity import Signer, aws_document, aws_evidence, gcp_claims

pytestmark = pytest.mark.unit

AUD = "https://kms.example:8443"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> DevCloud:
    return DevCloud.init(tmp_path_factory.mktemp("devcloud") / "state")


@pytest.fixture(scope="module")
def other_cloud(tmp_path_factory: pytest.TempPathFactory) -> DevCloud:
    return DevCloud.init(tmp_path_factory.mktemp("devcloud2") / "state")


@pytest.fixture(scope="module")
def signer(cloud: DevCloud) -> Signer:
    return Signer.of(cloud)


@pytest.fixture(scope="module")
def instance(cloud: DevCloud) -> Instance:
    return cloud.create(account="123456789012", image_id="ami-0abc", region="dev-east-1", zone="dev-east-1b")


@pytest.fixture(scope="module")
def trusts(cloud: DevCloud) -> list[ProviderTrust]:
    return [
        ProviderTrust.from_pem("devcloud", "aws-iid", cloud.certificate_pem(), None),
        ProviderTrust.from_pem("devcloud-gcp", "gcp-jwt", cloud.certificate_pem(), AUD),
    ]


@pytest.fixture
def bind() -> bytes:
    return binding(os.urandom(41), os.urandom(32))


def verify(evidence: dict[str, Any], trusts: list[ProviderTrust], bind: bytes, **kw: Any) -> InstanceIdentity:
    return verify_identity(evidence, trusts, binding=bind, now=kw.pop("now", NOW), audience=kw.pop("audience", AUD))


def rejected(evidence: Any, trusts: list[ProviderTrust], bind: bytes, **kw: Any) -> EvidenceRejected:
    with pytest.raises(EvidenceRejected) as info:
        verify(evidence, trusts, bind, **kw)
    assert info.value.status == 403
    assert info.value.code in {"evidence_invalid", "binding_mismatch"}
    return info.value


def aws_from(cloud: DevCloud, instance: Instance, bind: bytes) -> dict[str, str]:
    document, signature = cloud.aws_document(instance, bind.hex())
    return aws_evidence(document, signature)


def gcp_from(cloud: DevCloud, instance: Instance, bind: bytes, *, audience: str = AUD, now: datetime = NOW) -> dict:
    return {"type": "gcp-jwt", "token": cloud.gcp_token(instance, audience, bind.hex(), now)}


# --- round trips ------------------------------------------------------------------------------


def test_binding_is_sha256_of_nonce_then_key() -> None:
    assert binding(b"n", b"k") == hashlib.sha256(b"nk").digest()
    assert binding(b"n", b"k") != binding(b"k", b"n")
    assert len(binding(os.urandom(41), os.urandom(1216))) == 32


def test_aws_round_trip(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    identity = verify(aws_from(cloud, instance, bind), trusts, bind)
    assert identity == InstanceIdentity(
        provider="devcloud",
        kind="aws-iid",
        account="123456789012",
        instance_id=instance.id,
        image_id="ami-0abc",
        region="dev-east-1",
        zone="dev-east-1b",
        launched_at=instance.launched_at,
    )
    assert identity.key() == f"devcloud/123456789012/{instance.id}"
    claims = identity.claims()
    assert claims["instance_id"] == instance.id and claims["kind"] == "aws-iid"
    assert claims["launched_at"] == instance.launched_at.isoformat()
    assert all(isinstance(v, str) for v in claims.values())


def test_gcp_round_trip(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    identity = verify(gcp_from(cloud, instance, bind), trusts, bind)
    assert (identity.provider, identity.kind, identity.account) == ("devcloud-gcp", "gcp-jwt", "123456789012")
    assert (identity.instance_id, identity.image_id) == (instance.id, "ami-0abc")
    assert (identity.region, identity.zone) == ("dev-east-1", "dev-east-1-b")
    assert identity.launched_at == instance.launched_at
    assert identity.key() == f"devcloud-gcp/123456789012/{instance.id}"


@pytest.mark.parametrize(
    ("detached", "attributes"), [(False, True), (True, True), (False, False), (True, False)], ids=str
)
def test_aws_signature_shapes_accepted(
    signer: Signer, trusts: list[ProviderTrust], bind: bytes, detached: bool, attributes: bool
) -> None:
    """Attached or detached content, with or without signed attributes: all verify."""
    document = aws_document(bind.hex())
    signature = signer.pkcs7(document, detached=detached, attributes=attributes)
    assert verify(aws_evidence(document, signature), trusts, bind).instance_id == "i-0123456789abcdef0"


def test_gcp_zone_without_dash_region(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    token = signer.jwt(gcp_claims(bind.hex(), AUD, NOW))
    identity = verify({"type": "gcp-jwt", "token": token}, trusts, bind)
    assert (identity.region, identity.zone, identity.image_id) == ("europe-west1", "europe-west1-b", None)
    assert "image_id" not in identity.claims()


def test_provider_name_comes_from_the_trust_that_verified(
    cloud: DevCloud, other_cloud: DevCloud, instance: Instance, bind: bytes
) -> None:
    trusts = [
        ProviderTrust.from_pem("other", "aws-iid", other_cloud.certificate_pem(), None),
        ProviderTrust.from_pem("mine", "aws-iid", cloud.certificate_pem(), None),
    ]
    assert verify(aws_from(cloud, instance, bind), trusts, bind).provider == "mine"


# --- binding ----------------------------------------------------------------------------------


def test_aws_evidence_for_another_binding(
    cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes
) -> None:
    evidence = aws_from(cloud, instance, binding(os.urandom(41), os.urandom(32)))
    error = rejected(evidence, trusts, bind)
    assert error.code == "binding_mismatch"
    assert instance.id in error.message and "another nonce" in error.message


def test_gcp_evidence_for_another_binding(
    cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes
) -> None:
    assert rejected(gcp_from(cloud, instance, os.urandom(32)), trusts, bind).code == "binding_mismatch"


@pytest.mark.parametrize("nonce", ["", "00" * 31, "AB" * 32, "zz" * 32, "00" * 33])
def test_malformed_nonce_is_a_mismatch(signer: Signer, trusts: list[ProviderTrust], bind: bytes, nonce: str) -> None:
    document = aws_document(nonce or "x")
    error = rejected(aws_evidence(document, signer.pkcs7(document)), trusts, bind)
    assert error.code == "binding_mismatch"


def test_uppercase_binding_is_a_mismatch(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    document = aws_document(bind.hex().upper())
    assert rejected(aws_evidence(document, signer.pkcs7(document)), trusts, bind).code == "binding_mismatch"


def test_missing_nonce_is_invalid(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    document = aws_document(bind.hex(), nonce=None)
    error = rejected(aws_evidence(document, signer.pkcs7(document)), trusts, bind)
    assert error.code == "evidence_invalid" and "nonce" in error.message


# --- AWS forgeries ----------------------------------------------------------------------------


def test_aws_bad_signature(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    document, signature = cloud.aws_document(instance, bind.hex())
    damaged = signature[:-1] + bytes([signature[-1] ^ 1])  # the RSA signature value ends the DER
    error = rejected(aws_evidence(document, damaged), trusts, bind)
    assert error.code == "evidence_invalid"
    assert error.message == "the signature does not verify with any certificate of provider 'devcloud'"


def test_aws_wrong_provider_certificate(other_cloud: DevCloud, trusts: list[ProviderTrust], bind: bytes) -> None:
    """Another devcloud's identity is genuine, but not from a provider this tenant registered."""
    stranger = other_cloud.create(account="123456789012")
    error = rejected(aws_from(other_cloud, stranger, bind), trusts, bind)
    assert error.code == "evidence_invalid" and "does not verify with any certificate" in error.message


@pytest.mark.parametrize("field", ["accountId", "instanceId", "imageId", "region", "availabilityZone", "pendingTime"])
def test_aws_altered_field(
    cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes, field: str
) -> None:
    document, signature = cloud.aws_document(instance, bind.hex())
    doc = json.loads(document)
    doc[field] = "1999-01-01T00:00:00Z" if field == "pendingTime" else "i-attacker"
    error = rejected(aws_evidence(json.dumps(doc, indent=2).encode(), signature), trusts, bind)
    assert error.code == "evidence_invalid" and "not the one the signature covers" in error.message


def test_aws_altered_detached_document(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    document = aws_document(bind.hex())
    signature = signer.pkcs7(document, detached=True)
    forged = aws_document(bind.hex(), accountId="999999999999")
    error = rejected(aws_evidence(forged, signature), trusts, bind)
    assert "does not match the digest" in error.message


def test_aws_altered_detached_document_without_attributes(
    signer: Signer, trusts: list[ProviderTrust], bind: bytes
) -> None:
    signature = signer.pkcs7(aws_document(bind.hex()), detached=True, attributes=False)
    error = rejected(aws_evidence(aws_document(bind.hex(), accountId="999999999999"), signature), trusts, bind)
    assert "does not verify" in error.message


def test_aws_signature_moved_to_another_instance(
    cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes
) -> None:
    """A genuine signature of instance A presented with the genuine-looking document of instance B."""
    other = cloud.create()
    _, signature_a = cloud.aws_document(instance, bind.hex())
    document_b, _ = cloud.aws_document(other, bind.hex())
    assert "not the one the signature covers" in rejected(aws_evidence(document_b, signature_a), trusts, bind).message


def test_aws_wrong_digest_and_padding(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    document = aws_document(bind.hex())
    sha512 = rejected(aws_evidence(document, signer.pkcs7(document, digest=hashes.SHA512())), trusts, bind)
    assert "SHA-256" in sha512.message
    pss = rejected(aws_evidence(document, signer.pkcs7(document, pss=True)), trusts, bind)
    assert "PKCS#1 v1.5" in pss.message


def test_aws_expired_certificate(bind: bytes) -> None:
    old = Signer.make("retired signer", not_before=NOW - timedelta(days=60), not_after=NOW - timedelta(days=1))
    trusts = [ProviderTrust.from_pem("retired", "aws-iid", old.pem, None)]
    document = aws_document(bind.hex())
    evidence = aws_evidence(document, old.pkcs7(document))
    error = rejected(evidence, trusts, bind)
    assert "is not valid at" in error.message and "'retired'" in error.message
    # the same evidence verifies at a time the certificate was valid: the check is the validity, not the key
    assert verify(evidence, trusts, bind, now=NOW - timedelta(days=2)).provider == "retired"


def test_aws_not_yet_valid_certificate(bind: bytes) -> None:
    future = Signer.make("future signer", not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=9))
    document = aws_document(bind.hex())
    trusts = [ProviderTrust.from_pem("future", "aws-iid", future.pem, None)]
    assert "is not valid at" in rejected(aws_evidence(document, future.pkcs7(document)), trusts, bind).message


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"instanceId": None}, "'instanceId'"),
        ({"accountId": 123456789012}, "'accountId'"),
        ({"instanceId": "i-1/../i-2"}, "'instanceId'"),
        ({"region": ""}, "'region'"),
        ({"pendingTime": "yesterday"}, "'pendingTime'"),
        ({"pendingTime": "2025-01-02T03:04:05"}, "'pendingTime'"),
    ],
    ids=str,
)
def test_aws_signed_but_bad_fields(
    signer: Signer, trusts: list[ProviderTrust], bind: bytes, fields: dict[str, Any], needle: str
) -> None:
    document = aws_document(bind.hex(), **fields)
    error = rejected(aws_evidence(document, signer.pkcs7(document)), trusts, bind)
    assert error.code == "evidence_invalid" and needle in error.message


@pytest.mark.parametrize(
    "document", [b"[1, 2]", b"not json", b'{"a": 1, "a": 2}', b"\xff\xfe", b"[" * 5000 + b"]" * 5000], ids=repr
)
def test_aws_signed_but_not_a_document(
    signer: Signer, trusts: list[ProviderTrust], bind: bytes, document: bytes
) -> None:
    error = rejected(aws_evidence(document, signer.pkcs7(document)), trusts, bind)
    assert error.code == "evidence_invalid" and "identity document" in error.message


def test_aws_message_never_holds_the_document(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    document = aws_document(bind.hex(), instanceId="i-SECRETMARKER/1")
    for signature in (signer.pkcs7(document), b"\x30\x03\x02\x01\x01"):
        error = rejected(aws_evidence(document, signature), trusts, bind)
        assert "SECRETMARKER" not in str(error) and "SECRETMARKER" not in error.diagnostics()


# --- garbage, truncated, oversized --------------------------------------------------------------


@pytest.mark.parametrize(
    "evidence",
    [
        {},
        {"type": "tpm2"},
        {"type": 7},
        {"type": "aws-iid"},
        {"type": "aws-iid", "document": "", "signature": ""},
        {"type": "aws-iid", "document": "!!!", "signature": "AAAA"},
        {"type": "aws-iid", "document": 5, "signature": None},
        {"type": "aws-iid", "document": "e30=", "signature": "not base64"},
        {"type": "aws-iid", "document": "e30=", "signature": base64.b64encode(b"garbage").decode()},
        {"type": "aws-iid", "document": "e30=", "signature": "MAA="},
        {"type": "aws-iid", "document": "e30=", "signature": "AAAA", "extra": "x"},
        {"type": "gcp-jwt"},
        {"type": "gcp-jwt", "token": ""},
        {"type": "gcp-jwt", "token": "a.b.c"},
        {"type": "gcp-jwt", "token": "garbage"},
        {"type": "gcp-jwt", "token": ["a", "b"]},
        {"type": "gcp-jwt", "token": "é.é.é"},
        "not an object",
        ["aws-iid"],
    ],
    ids=repr,
)
def test_garbage(evidence: Any, trusts: list[ProviderTrust], bind: bytes) -> None:
    assert rejected(evidence, trusts, bind).code == "evidence_invalid"


def test_aws_truncated(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    document, signature = cloud.aws_document(instance, bind.hex())
    for cut in (1, 2, 10, len(signature) // 2, len(signature) - 1):
        assert "does not parse" in rejected(aws_evidence(document, signature[:cut]), trusts, bind).message
    assert "not the one" in rejected(aws_evidence(document[:-1], signature), trusts, bind).message


def test_aws_trailing_bytes(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    document, signature = cloud.aws_document(instance, bind.hex())
    assert "does not parse" in rejected(aws_evidence(document, signature + b"\x00"), trusts, bind).message


def test_gcp_truncated(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    token = cloud.gcp_token(instance, AUD, bind.hex(), NOW)
    for cut in (5, len(token) // 2, len(token) - 1):
        rejected({"type": "gcp-jwt", "token": token[:cut]}, trusts, bind)


def test_oversized(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    big = aws_document(bind.hex(), padding="x" * 17000)
    assert "larger than 16384" in rejected(aws_evidence(big, signer.pkcs7(big)), trusts, bind).message
    small = aws_document(bind.hex())
    huge_sig = aws_evidence(small, b"\x30" * 17000)
    assert "'signature' is larger" in rejected(huge_sig, trusts, bind).message
    token = signer.jwt(gcp_claims(bind.hex(), AUD, NOW, padding="x" * 17000))
    assert "larger than 16384" in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


def test_document_just_under_the_cap_verifies(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    base = len(aws_document(bind.hex(), padding=""))
    document = aws_document(bind.hex(), padding="x" * (16 * 1024 - base))
    assert len(document) == 16 * 1024
    # detached: an attached copy of a 16 KiB document would itself pass the 16 KiB cap of the signature
    signature = signer.pkcs7(document, detached=True)
    assert verify(aws_evidence(document, signature), trusts, bind).account == "123456789012"
    too_big = aws_document(bind.hex(), padding="x" * (16 * 1024 - base + 1))
    assert "larger" in rejected(aws_evidence(too_big, signer.pkcs7(too_big, detached=True)), trusts, bind).message


def test_no_provider_of_that_kind(
    cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes
) -> None:
    only_gcp = [t for t in trusts if t.kind == "gcp-jwt"]
    assert "no aws-iid provider" in rejected(aws_from(cloud, instance, bind), only_gcp, bind).message
    assert "no gcp-jwt provider" in rejected(gcp_from(cloud, instance, bind), [], bind).message


# --- GCP forgeries ----------------------------------------------------------------------------


def test_gcp_bad_signature(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    head, body, sig = cloud.gcp_token(instance, AUD, bind.hex(), NOW).split(".")
    damaged = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    error = rejected({"type": "gcp-jwt", "token": f"{head}.{body}.{damaged}"}, trusts, bind)
    assert (
        error.message
        == "the identity token's signature does not verify with any certificate of provider 'devcloud-gcp'"
    )


def test_gcp_altered_claims(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    head, body, sig = cloud.gcp_token(instance, AUD, bind.hex(), NOW).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["google"]["compute_engine"]["instance_id"] = "i-attacker"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert "does not verify" in rejected({"type": "gcp-jwt", "token": f"{head}.{forged}.{sig}"}, trusts, bind).message


def test_gcp_wrong_provider_certificate(other_cloud: DevCloud, trusts: list[ProviderTrust], bind: bytes) -> None:
    stranger = other_cloud.create()
    assert "does not verify" in rejected(gcp_from(other_cloud, stranger, bind), trusts, bind).message


def test_gcp_expired(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    issued = NOW - timedelta(seconds=3600 + 61)
    assert "expired" in rejected(gcp_from(cloud, instance, bind, now=issued), trusts, bind).message
    # within the 60 s leeway it is still accepted
    within = NOW - timedelta(seconds=3600 + 59)
    assert verify(gcp_from(cloud, instance, bind, now=within), trusts, bind).instance_id == instance.id


def test_gcp_issued_in_the_future(
    cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes
) -> None:
    ahead = NOW + timedelta(seconds=120)
    assert "future" in rejected(gcp_from(cloud, instance, bind, now=ahead), trusts, bind).message


def test_gcp_not_before(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    token = signer.jwt(gcp_claims(bind.hex(), AUD, NOW, nbf=int(NOW.timestamp()) + 600))
    assert "not valid yet" in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


def test_gcp_wrong_audience(cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes) -> None:
    evidence = gcp_from(cloud, instance, bind, audience="https://other-kms.example")
    error = rejected(evidence, trusts, bind)
    assert "another audience" in error.message and AUD in error.message


def test_gcp_audience_list_refused(signer: Signer, trusts: list[ProviderTrust], bind: bytes) -> None:
    token = signer.jwt(gcp_claims(bind.hex(), AUD, NOW, aud=[AUD, "https://other"]))
    assert "another audience" in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


def test_gcp_provider_registered_for_another_audience(cloud: DevCloud, instance: Instance, bind: bytes) -> None:
    trusts = [ProviderTrust.from_pem("gcp", "gcp-jwt", cloud.certificate_pem(), "https://old-kms.example")]
    error = rejected(gcp_from(cloud, instance, bind), trusts, bind)
    assert "registered for another audience" in error.message


@pytest.mark.parametrize("missing", ["exp", "iat", "aud"])
def test_gcp_required_claims(signer: Signer, trusts: list[ProviderTrust], bind: bytes, missing: str) -> None:
    token = signer.jwt(gcp_claims(bind.hex(), AUD, NOW, **{missing: None}))
    assert f"'{missing}'" in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"google": None}, "google.compute_engine"),
        ({"google": {"compute_engine": "x"}}, "google.compute_engine"),
        ({"google": {"compute_engine": {"project_id": "p", "instance_id": "1", "zone": "nodash"}}}, "'zone'"),
        ({"google": {"compute_engine": {"project_id": "p", "zone": "eu-west1-b"}}}, "'instance_id'"),
        (
            {"google": {"compute_engine": {"project_id": "p", "instance_id": "1", "zone": "a-b"}}},
            "'instance_creation_timestamp'",
        ),
        ({"exp": "tomorrow"}, "'exp'"),
        ({"iat": True}, "'iat'"),
    ],
    ids=str,
)
def test_gcp_signed_but_bad_claims(
    signer: Signer, trusts: list[ProviderTrust], bind: bytes, fields: dict[str, Any], needle: str
) -> None:
    token = signer.jwt(gcp_claims(bind.hex(), AUD, NOW, **fields))
    assert needle in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


def test_gcp_standard_format_lacks_instance_claims(
    cloud: DevCloud, instance: Instance, trusts: list[ProviderTrust], bind: bytes
) -> None:
    token = cloud.gcp_token(instance, AUD, bind.hex(), NOW, full=False)
    assert "format=full" in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_gcp_alg_none(trusts: list[ProviderTrust], bind: bytes) -> None:
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(gcp_claims(bind.hex(), AUD, NOW)).encode())
    for token in (f"{header}.{body}.", f"{header}.{body}.AAAA"):
        assert "RS256" in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


def test_gcp_hs256_with_the_public_certificate_as_secret(
    cloud: DevCloud, trusts: list[ProviderTrust], bind: bytes
) -> None:
    """The classic confusion: HMAC keyed with the provider's public key (which anyone has)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(gcp_claims(bind.hex(), AUD, NOW)).encode())
    public_der = cloud.certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for secret in (cloud.certificate_pem().encode(), public_der, b""):
        mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
        token = f"{header}.{body}.{_b64url(mac)}"
        assert "RS256" in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


def test_gcp_header_claims_rs256_but_token_is_hs256(cloud: DevCloud, trusts: list[ProviderTrust], bind: bytes) -> None:
    header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(gcp_claims(bind.hex(), AUD, NOW)).encode())
    mac = hmac.new(cloud.certificate_pem().encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert (
        "does not verify"
        in rejected({"type": "gcp-jwt", "token": f"{header}.{body}.{_b64url(mac)}"}, trusts, bind).message
    )


def test_gcp_expired_certificate(bind: bytes) -> None:
    old = Signer.make("retired", not_before=NOW - timedelta(days=60), not_after=NOW - timedelta(days=1))
    trusts = [ProviderTrust.from_pem("retired", "gcp-jwt", old.pem, AUD)]
    token = old.jwt(gcp_claims(bind.hex(), AUD, NOW))
    assert "is not valid at" in rejected({"type": "gcp-jwt", "token": token}, trusts, bind).message


# --- caller mistakes --------------------------------------------------------------------------


def test_naive_now_and_short_binding_are_programming_errors(trusts: list[ProviderTrust], bind: bytes) -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_identity({}, trusts, binding=bind, now=datetime.now(), audience=AUD)
    with pytest.raises(ValueError, match="32 bytes"):
        verify_identity({}, trusts, binding=bind[:16], now=NOW, audience=AUD)


# --- provider registration ----------------------------------------------------------------------


def test_provider_trust_from_pem(cloud: DevCloud, other_cloud: DevCloud) -> None:
    both = cloud.certificate_pem() + other_cloud.certificate_pem()
    trust = ProviderTrust.from_pem("devcloud", "aws-iid", both, None)
    assert len(trust.certificates) == 2 and trust.audience is None
    assert ProviderTrust.from_pem("g", "gcp-jwt", both, AUD).audience == AUD
    assert ProviderTrust.from_pem("a", "aws-iid", both, "").audience is None


def _ec_cert_pem() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("name", "kind", "pem", "audience", "needle"),
    [
        ("p", "tpm2", "VALID", None, "unknown provider kind"),
        ("", "aws-iid", "VALID", None, "provider name"),
        ("a/b", "aws-iid", "VALID", None, "provider name"),
        ("p", "aws-iid", "", None, "do not parse"),
        ("p", "aws-iid", "garbage", None, "do not parse"),
        ("p", "aws-iid", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", None, "do not parse"),
        ("p", "aws-iid", "VALID" + " " * 65536, None, "at most 65536"),
        ("p", "gcp-jwt", "VALID", None, "needs the audience"),
        ("p", "aws-iid", "VALID", AUD, "only gcp-jwt"),
        ("p", "aws-iid", "RSA1024", None, "1024-bit"),
        ("p", "aws-iid", "EC", None, "RSA key"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_provider_trust_refused(
    cloud: DevCloud, name: str, kind: str, pem: str, audience: str | None, needle: str
) -> None:
    pem = pem.replace("VALID", cloud.certificate_pem())
    if pem == "RSA1024":
        pem = Signer.make(bits=1024).pem
    elif pem == "EC":
        pem = _ec_cert_pem()
    with pytest.raises(BadRequest) as info:
        ProviderTrust.from_pem(name, kind, pem, audience)
    assert info.value.code == "bad_provider" and info.value.status == 400
    assert needle in info.value.message


def test_identity_helpers_reach_the_files(tmp_path: Path) -> None:
    """Signer.of reads the devcloud's own key: what it signs verifies like the metadata service's."""
    cloud = DevCloud.init(tmp_path / "s")
    signer = Signer.of(cloud)
    assert signer.cert == cloud.certificate
