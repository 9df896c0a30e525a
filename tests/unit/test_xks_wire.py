"""The XKS wire codec against the spec's own examples, and against bad and fuzzed bodies."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.formats import xks_wire as wire

pytestmark = pytest.mark.unit

META = {
    "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
    "kmsKeyArn": "arn:aws:kms:us-east-2:1:key/k",
    "kmsOperation": "Encrypt",
    "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
    "kmsViaService": "ebs",
}


def test_integrity_value_reproduces_the_spec_example() -> None:
    # Appendix C: the Encrypt response example and its ciphertextDataIntegrityValue
    result = wire.EncryptResult(
        ciphertext=base64.b64decode("ghxkK1txeDNn3q8Y"),
        iv=base64.b64decode("HMrlRw85cAJUd5Ax"),
        tag=base64.b64decode("vBxN2ncH1oEkR8WVXpmyYQ=="),
        ciphertext_metadata=base64.b64decode("a2V5X3ZlcnNpb249MQ=="),
    )
    aad = base64.b64decode("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n")
    assert aad == b"project=nile,department=marketing" and len(aad) == 33
    value = wire.integrity_value(aad, result)
    assert value.hex() == "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
    assert base64.b64encode(value).decode() == "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
    body = json.loads(wire.encode_encrypt(result, value))
    assert body["ciphertextDataIntegrityValue"] == "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
    assert body["ciphertextMetadata"] == "a2V5X3ZlcnNpb249MQ=="


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=4400), st.binary(min_size=12, max_size=12), st.binary(min_size=16, max_size=16),
       st.none() | st.binary(max_size=20), st.none() | st.binary(min_size=32, max_size=32))  # fmt: skip
def test_answers_are_json_of_standard_base64_that_decodes_to_the_bytes(
    data: bytes, iv: bytes, tag: bytes, meta: bytes | None, integrity: bytes | None
) -> None:
    """The answers are written without json.dumps: they must still be JSON objects of exactly the spec's
    fields, each the standard base64 of its bytes (a bytearray plaintext too, as the decrypt hands it)."""
    assert json.loads(wire.encode_decrypt(bytearray(data))) == {"plaintext": base64.b64encode(data).decode()}
    result = wire.EncryptResult(ciphertext=data, iv=iv, tag=tag, ciphertext_metadata=meta)
    body = json.loads(wire.encode_encrypt(result, integrity))
    expected = {"ciphertext": data, "initializationVector": iv, "authenticationTag": tag,
                "ciphertextMetadata": meta, "ciphertextDataIntegrityValue": integrity}  # fmt: skip
    assert body == {k: base64.b64encode(v).decode() for k, v in expected.items() if v is not None}


def test_aad_framing_keeps_aad_and_metadata_apart() -> None:
    assert wire.framed_aad(None, None) == b"\x00\x00\x00"
    assert wire.framed_aad(b"ab", b"m") == b"\x00\x02ab\x01m"
    # the spec's own example of a confusion the lengths prevent: metadata passed back as AAD
    assert wire.framed_aad(None, b"meta") != wire.framed_aad(b"meta", None)
    assert wire.framed_aad(b"x" * 8192, None)[:2] == b"\x20\x00"


def test_parses_the_spec_examples() -> None:
    enc = wire.parse_encrypt(
        json.dumps(
            {
                "requestMetadata": META,
                "additionalAuthenticatedData": "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n",
                "plaintext": "SGVsbG8gV29ybGQh",
                "encryptionAlgorithm": "AES_GCM",
                "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
            }
        ).encode()
    )
    assert enc.plaintext == b"Hello World!" and enc.want_integrity_value
    assert enc.metadata.facts()["via_service"] == "ebs" and "source_vpc" not in enc.metadata.facts()
    dec = wire.parse_decrypt(
        json.dumps(
            {
                "requestMetadata": {**META, "kmsOperation": "Decrypt"},
                "encryptionAlgorithm": "AES_GCM",
                "ciphertext": "ghxkK1txeDNn3q8Y",
                "ciphertextMetadata": "a2V5X3ZlcnNpb249MQ==",
                "initializationVector": "HMrlRw85cAJUd5Ax",
                "authenticationTag": "vBxN2ncH1oEkR8WVXpmyYQ==",
            }
        ).encode()
    )
    assert dec.ciphertext_metadata == b"key_version=1" and len(dec.iv) == 12
    meta = wire.parse_metadata(
        b'{"requestMetadata": {"awsPrincipalArn": "a", "kmsOperation": "CreateKey", "kmsRequestId": "r"}}'
    )
    assert meta.operation == "CreateKey" and meta.key_arn is None
    # an operation KMS may add later is accepted (the spec says MUST NOT reject)
    assert (
        wire.parse_metadata(
            b'{"requestMetadata": {"awsPrincipalArn": "a", "kmsOperation": "BulkFuture",'
            b' "kmsRequestId": "r", "newField": 1}}'
        ).operation
        == "BulkFuture"
    )


def _encrypt(**fields: object) -> bytes:
    body = {"requestMetadata": META, "plaintext": "SGVsbG8=", "encryptionAlgorithm": "AES_GCM", **fields}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("body", "name"),
    [
        (b'{"requestMetadata": ', "ValidationException"),  # truncated JSON
        (b"[1, 2]", "ValidationException"),
        (b"\xff\xfe", "ValidationException"),
        (b"[" * 100000, "ValidationException"),  # deep nesting
        (_encrypt(requestMetadata=None), "ValidationException"),
        (_encrypt(requestMetadata={"kmsOperation": "Encrypt"}), "ValidationException"),
        (_encrypt(requestMetadata={**META, "kmsRequestId": 7}), "ValidationException"),
        (_encrypt(requestMetadata={**META, "awsPrincipalArn": "a" * 2049}), "ValidationException"),
        (_encrypt(plaintext=None), "ValidationException"),
        (_encrypt(plaintext="SGVsbG8"), "ValidationException"),  # no padding
        (_encrypt(plaintext="SGVs bG8="), "ValidationException"),
        (_encrypt(plaintext="SGVsbG8_"), "ValidationException"),  # URL alphabet
        (_encrypt(plaintext=base64.b64encode(b"x" * 4301).decode()), "UnsupportedOperationException"),
        (_encrypt(additionalAuthenticatedData=base64.b64encode(b"x" * 8193).decode()), "UnsupportedOperationException"),
        (_encrypt(encryptionAlgorithm="AES_CBC"), "UnsupportedOperationException"),
        (_encrypt(encryptionAlgorithm=None), "ValidationException"),
        (_encrypt(ciphertextDataIntegrityValueAlgorithm="MD5"), "UnsupportedOperationException"),
    ],
)
def test_bad_encrypt_bodies_are_refused_with_the_spec_names(body: bytes, name: str) -> None:
    with pytest.raises(wire.XksError) as caught:
        wire.parse_encrypt(body)
    assert caught.value.name == name and caught.value.status == wire.ERRORS[name]


def test_bad_decrypt_fields_are_invalid_ciphertext() -> None:
    base = {
        "requestMetadata": META,
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": "AAAA",
        "initializationVector": base64.b64encode(b"i" * 12).decode(),
        "authenticationTag": base64.b64encode(b"t" * 16).decode(),
    }
    wire.parse_decrypt(json.dumps(base).encode())
    for field, value in [
        ("initializationVector", base64.b64encode(b"i" * 11).decode()),
        ("authenticationTag", base64.b64encode(b"t" * 15).decode()),
        ("ciphertextMetadata", base64.b64encode(b"m" * 21).decode()),
    ]:
        with pytest.raises(wire.XksError) as caught:
            wire.parse_decrypt(json.dumps({**base, field: value}).encode())
        assert caught.value.name == "InvalidCiphertextException", field


def test_routes() -> None:
    assert wire.route("/kms/xks/v1/health") == wire.Route("", "health")
    assert wire.route("/a/b-c/kms/xks/v1/keys/K.1_x-/encrypt") == wire.Route("/a/b-c", "encrypt", "K.1_x-")
    for bad in [
        "/kms/xks/v1/keys/k/sign",
        "/kms/xks/v2/health",
        "/p/kms/xks/v1/keys/../encrypt",
        "/p%2F/kms/xks/v1/health",
        "/p/kms/xks/v1/keys/k/encrypt?x=1",
        "/" + "a" * 120 + "/kms/xks/v1/health",
        "/p/kms/xks/v1/keys/" + "k" * 129 + "/metadata",
        "/p//kms/xks/v1/health",
    ]:
        with pytest.raises(wire.XksError) as caught:
            wire.route(bad)
        assert caught.value.name == "InvalidUriPathException", bad


def test_error_messages_are_printable_ascii_under_512() -> None:
    body = json.loads(wire.error_body("InternalException", "é\n" + "x" * 600))
    assert len(body["errorMessage"]) < 512 and all(" " <= c <= "~" for c in body["errorMessage"])
    with pytest.raises(ValueError):
        wire.XksError("NoSuchException", "x")


def test_prefixes() -> None:
    assert wire.check_prefix("acme/ebs") == "/acme/ebs" and wire.check_prefix("/") == ""
    for bad in ["a b", "a/../b", "a" * 118, "a.b"]:
        with pytest.raises(ValueError):
            wire.check_prefix(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | st.text(max_size=256).map(str.encode))
def test_fuzzed_bodies_only_ever_raise_xks_errors(body: bytes) -> None:
    for parse in (wire.parse_encrypt, wire.parse_decrypt, wire.parse_metadata, wire.parse_health):
        try:
            parse(body)
        except wire.XksError as exc:
            assert exc.status in (400, 501)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=20,
    )
)
def test_fuzzed_json_shapes_only_ever_raise_xks_errors(value: object) -> None:
    body = json.dumps(
        {
            "requestMetadata": value,
            "plaintext": value,
            "ciphertext": value,
            "initializationVector": value,
            "authenticationTag": value,
            "encryptionAlgorithm": "AES_GCM",
        }
    )
    for parse in (wire.parse_encrypt, wire.parse_decrypt, wire.parse_metadata):
        with pytest.raises(wire.XksError):
            parse(body.encode())


def test_version_metadata_round_trip_and_refusals() -> None:
    from keysteward.errors import InvalidCiphertext
    from keysteward.keys.xks_crypto import metadata_version, version_metadata

    assert len(version_metadata(7)) <= wire.MAX_METADATA and metadata_version(version_metadata(7)) == 7
    for bad in [None, b"", b"ks1", b"ks2\x00\x00\x00\x01", b"ks1\x00\x00\x00\x00", b"ks1\x00\x00\x00\x01\x00"]:
        with pytest.raises(InvalidCiphertext):
            metadata_version(bad)


def test_framed_aad_never_begins_like_keystewards_own_aads() -> None:
    # every AAD keysteward uses under a KEK begins with "keysteward/"; the framed XKS AAD begins with a length <= 8192
    for size in (0, 1, 255, 8192):
        assert wire.framed_aad(b"k" * size, b"ks1\x00\x00\x00\x01")[:1] < b"k"
