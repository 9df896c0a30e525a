"""The AWS KMS External Key Store (XKS) proxy API v1 wire format: JSON bodies in, typed requests out.

Pure: bytes in, frozen dataclasses out (and back), no sockets, clocks or keys. Checked against the
public specification (aws/aws-kms-xksproxy-api-spec, v1.0.3):

- request bodies of GetKeyMetadata, Encrypt, Decrypt and GetHealthStatus, each with ``requestMetadata``
  (``awsPrincipalArn``, ``kmsKeyArn``, ``kmsOperation``, ``kmsRequestId``, ``kmsViaService``,
  ``awsSourceVpc``, ``awsSourceVpce``); ``kmsOperation`` and ``kmsRequestId`` are opaque strings, any
  value accepted; unknown fields are ignored (KMS may add metadata);
- standard base64 (RFC 4648 section 4, with padding) for every binary field, checked strictly;
- the AES-GCM AAD framing the spec asks for: ``len(aad) as 2 bytes big-endian || aad ||
  len(ciphertextMetadata) as 1 byte || ciphertextMetadata`` (:func:`framed_aad`);
- the ciphertext data integrity value (Appendix C): SHA-256 over ``aad || ciphertextMetadata || iv ||
  ciphertext || tag`` (:func:`integrity_value`);
- error bodies ``{"errorName", "errorMessage"}``, the message under 512 printable ASCII characters.

Every refusal is an :class:`XksError` carrying the spec's error name and HTTP status.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Final

MAX_PLAINTEXT: Final = 4300
"""Plaintext (and ciphertext) bytes the spec requires a proxy to take; more answers UnsupportedOperation."""
MAX_AAD: Final = 8192
MAX_METADATA: Final = 20
MAX_ARN: Final = 2048
MAX_TEXT: Final = 2048
"""Longest requestMetadata string taken (ARNs up to 2048 characters, the spec says)."""
IV_SIZES: Final = (12, 16)
TAG_SIZE: Final = 16
MAX_ERROR_MESSAGE: Final = 511
ALGORITHM: Final = "AES_GCM"
CDIV_ALGORITHM: Final = "SHA_256"
KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
OPERATIONS: Final = ("metadata", "encrypt", "decrypt")
_METADATA_FIELDS: Final = {
    "awsPrincipalArn": "principal_arn",
    "kmsKeyArn": "key_arn",
    "kmsOperation": "operation",
    "kmsRequestId": "request_id",
    "kmsViaService": "via_service",
    "awsSourceVpc": "source_vpc",
    "awsSourceVpce": "source_vpce",
}
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "health": ("kmsOperation", "kmsRequestId"),
    "metadata": ("awsPrincipalArn", "kmsOperation", "kmsRequestId"),
    "encrypt": ("awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId"),
    "decrypt": ("awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId"),
}

# error name -> HTTP status, exactly the table of the spec's "Error codes" section
ERRORS: Final[dict[str, int]] = {
    "ValidationException": 400,
    "InvalidStateException": 400,
    "InvalidCiphertextException": 400,
    "InvalidKeyUsageException": 400,
    "AuthenticationFailedException": 401,
    "AccessDeniedException": 403,
    "KeyNotFoundException": 404,
    "InvalidUriPathException": 404,
    "ThrottlingException": 429,
    "UnsupportedOperationException": 501,
    "DependencyTimeoutException": 503,
    "InternalException": 500,
}


class XksError(Exception):
    """A refusal in the spec's terms: ``name`` is an ``errorName``, ``status`` its HTTP status."""

    def __init__(self, name: str, message: str) -> None:
        if name not in ERRORS:
            raise ValueError(f"not an XKS error name: {name}")
        super().__init__(message)
        self.name = name
        self.status = ERRORS[name]
        self.message = message

    def body(self) -> bytes:
        return error_body(self.name, self.message)


def printable(text: str) -> str:
    """``text`` as the spec allows an errorMessage: printable ASCII (0x20-0x7e), under 512 characters."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned[:MAX_ERROR_MESSAGE]


def error_body(name: str, message: str) -> bytes:
    return json.dumps({"errorName": name, "errorMessage": printable(message)}).encode()


@dataclass(frozen=True)
class RequestMetadata:
    """``requestMetadata`` as the policy sees it (``kms`` facts); optional fields are None when absent."""

    operation: str
    request_id: str
    principal_arn: str | None = None
    key_arn: str | None = None
    via_service: str | None = None
    source_vpc: str | None = None
    source_vpce: str | None = None

    def facts(self) -> dict[str, str]:
        """The present fields under their policy names (``operation``, ``principal_arn``...)."""
        return {name: value for name, value in self.__dict__.items() if value is not None}


@dataclass(frozen=True, repr=False)
class EncryptRequest:
    metadata: RequestMetadata
    plaintext: bytes
    aad: bytes | None
    want_integrity_value: bool

    def __repr__(self) -> str:
        return f"EncryptRequest({self.metadata.request_id[:64]!r}, {len(self.plaintext)} bytes)"


@dataclass(frozen=True)
class DecryptRequest:
    metadata: RequestMetadata
    ciphertext: bytes
    ciphertext_metadata: bytes | None
    aad: bytes | None
    iv: bytes
    tag: bytes


@dataclass(frozen=True)
class EncryptResult:
    ciphertext: bytes
    iv: bytes
    tag: bytes
    ciphertext_metadata: bytes | None


def _invalid(message: str) -> XksError:
    return XksError("ValidationException", message)


def _object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _invalid("the body is not JSON") from None
    if not isinstance(data, dict):
        raise _invalid("the body must be a JSON object")
    return data


def _text(data: dict[str, Any], name: str, *, required: bool, limit: int = MAX_TEXT) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise _invalid(f"{name} is required")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise _invalid(f"{name} must be a string of at most {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{name} must be valid Unicode") from None
    return value


def _metadata(data: dict[str, Any], api: str) -> RequestMetadata:
    raw = data.get("requestMetadata")
    if not isinstance(raw, dict):
        raise _invalid("requestMetadata is required and must be an object")
    required = _REQUIRED[api]
    values = {attr: _text(raw, name, required=name in required) for name, attr in _METADATA_FIELDS.items()}
    if api == "health":  # the health call carries only these two; anything else is not for the policy
        values = {k: v for k, v in values.items() if k in ("operation", "request_id")}
    return RequestMetadata(**values)  # type: ignore[arg-type]


def b64decode(value: Any, name: str, *, max_size: int, error: str = "ValidationException") -> bytes:
    """Strict standard base64 (padding, no whitespace, no URL alphabet) of at most ``max_size`` bytes."""
    if not isinstance(value, str):
        raise XksError(error, f"{name} must be a base64 string")
    if len(value) > 4 * ((max_size + 2) // 3):
        too_big = "UnsupportedOperationException" if error == "ValidationException" else error
        raise XksError(too_big, f"{name} is larger than {max_size} bytes")
    try:  # strict: only the standard alphabet, padding only at the end and exactly right, no whitespace
        decoded = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise XksError(error, f"{name} is not standard base64") from None
    if len(decoded) > max_size:
        too_big = "UnsupportedOperationException" if error == "ValidationException" else error
        raise XksError(too_big, f"{name} is larger than {max_size} bytes")
    return decoded


def _algorithm(data: dict[str, Any]) -> None:
    algorithm = data.get("encryptionAlgorithm")
    if algorithm is None:
        raise _invalid("encryptionAlgorithm is required")
    if algorithm != ALGORITHM:
        raise XksError("UnsupportedOperationException", f"encryptionAlgorithm must be {ALGORITHM}")


def parse_health(body: bytes) -> RequestMetadata:
    return _metadata(_object(body), "health")


def parse_metadata(body: bytes) -> RequestMetadata:
    return _metadata(_object(body), "metadata")


def parse_encrypt(body: bytes) -> EncryptRequest:
    data = _object(body)
    metadata = _metadata(data, "encrypt")
    _algorithm(data)
    if "plaintext" not in data:
        raise _invalid("plaintext is required")
    plaintext = b64decode(data["plaintext"], "plaintext", max_size=MAX_PLAINTEXT)
    aad = data.get("additionalAuthenticatedData")
    cdiv = data.get("ciphertextDataIntegrityValueAlgorithm")
    if cdiv is not None and cdiv != CDIV_ALGORITHM:
        raise XksError(
            "UnsupportedOperationException", f"ciphertextDataIntegrityValueAlgorithm must be {CDIV_ALGORITHM}"
        )
    return EncryptRequest(
        metadata=metadata,
        plaintext=plaintext,
        aad=None if aad is None else b64decode(aad, "additionalAuthenticatedData", max_size=MAX_AAD),
        want_integrity_value=cdiv is not None,
    )


def parse_decrypt(body: bytes) -> DecryptRequest:
    data = _object(body)
    metadata = _metadata(data, "decrypt")
    _algorithm(data)
    for name in ("ciphertext", "initializationVector", "authenticationTag"):
        if name not in data:
            raise _invalid(f"{name} is required")
    bad = "InvalidCiphertextException"
    iv = b64decode(data["initializationVector"], "initializationVector", max_size=16, error=bad)
    tag = b64decode(data["authenticationTag"], "authenticationTag", max_size=TAG_SIZE, error=bad)
    if len(iv) not in IV_SIZES:
        raise XksError(bad, "initializationVector must be 12 or 16 bytes")
    if len(tag) != TAG_SIZE:
        raise XksError(bad, "authenticationTag must be 16 bytes")
    aad, meta = data.get("additionalAuthenticatedData"), data.get("ciphertextMetadata")
    return DecryptRequest(
        metadata=metadata,
        ciphertext=b64decode(data["ciphertext"], "ciphertext", max_size=MAX_PLAINTEXT),
        ciphertext_metadata=None
        if meta is None
        else b64decode(meta, "ciphertextMetadata", max_size=MAX_METADATA, error=bad),
        aad=None if aad is None else b64decode(aad, "additionalAuthenticatedData", max_size=MAX_AAD),
        iv=iv,
        tag=tag,
    )


def framed_aad(aad: bytes | None, ciphertext_metadata: bytes | None) -> bytes:
    """The AES-GCM AAD of the spec: both parts length-prefixed, so neither can pose as the other."""
    aad, meta = aad or b"", ciphertext_metadata or b""
    if len(aad) > 0xFFFF or len(meta) > MAX_METADATA:
        raise ValueError("AAD or ciphertext metadata too long to frame")
    return len(aad).to_bytes(2, "big") + aad + len(meta).to_bytes(1, "big") + meta


def integrity_value(aad: bytes | None, result: EncryptResult) -> bytes:
    """The ciphertextDataIntegrityValue (Appendix C): SHA-256 over the decoded fields, no lengths."""
    parts = (aad or b"", result.ciphertext_metadata or b"", result.iv, result.ciphertext, result.tag)
    return hashlib.sha256(b"".join(parts)).digest()


def _b64_json(fields: list[tuple[bytes, bytes | bytearray]]) -> bytes:
    """A JSON object of base64 strings, written directly: base64's alphabet needs no JSON escape, and a
    4 KiB answer cost more in ``json.dumps`` than in its AES-GCM."""
    parts = [b'"' + name + b'":"' + binascii.b2a_base64(value, newline=False) + b'"' for name, value in fields]
    return b"{" + b",".join(parts) + b"}"


def encode_encrypt(result: EncryptResult, integrity: bytes | None) -> bytes:
    fields: list[tuple[bytes, bytes | bytearray]] = [
        (b"ciphertext", result.ciphertext),
        (b"initializationVector", result.iv),
        (b"authenticationTag", result.tag),
    ]
    if result.ciphertext_metadata is not None:
        fields.append((b"ciphertextMetadata", result.ciphertext_metadata))
    if integrity is not None:
        fields.append((b"ciphertextDataIntegrityValue", integrity))
    return _b64_json(fields)


def encode_decrypt(plaintext: bytes | bytearray) -> bytes:
    return _b64_json([(b"plaintext", plaintext)])


def encode_metadata(enabled: bool, usage: tuple[str, ...]) -> bytes:
    body = {"keySpec": "AES_256", "keyUsage": list(usage), "keyStatus": "ENABLED" if enabled else "DISABLED"}
    return json.dumps(body).encode()


@dataclass(frozen=True)
class FleetMember:
    id: str
    model: str
    health: str  # ACTIVE | DEGRADED | UNAVAILABLE


def encode_health(fleet_size: int, vendor: str, model: str, members: list[FleetMember]) -> bytes:
    if not 1 <= len(members) <= 10 or fleet_size < 1:
        raise ValueError("a health answer lists 1 to 10 key managers and a fleet of at least one")
    body = {
        "xksProxyFleetSize": fleet_size,
        "xksProxyVendor": vendor,
        "xksProxyModel": model,
        "ekmVendor": vendor,
        "ekmFleetDetails": [{"id": m.id, "model": m.model, "healthStatus": m.health} for m in members],
    }
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Route:
    """Where a request path leads: the store's prefix, the API, and the external key id (key APIs)."""

    prefix: str
    api: str  # health | metadata | encrypt | decrypt
    key_id: str | None = None


_PREFIX_RE: Final = re.compile(r"(/[A-Za-z0-9_-]+)*")
_MARK: Final = "/kms/xks/v1"
MAX_URI_PATH: Final = 128
"""XksProxyUriPath (the prefix and /kms/xks/v1) is at most 128 characters of [A-Za-z0-9/_-]."""


def check_prefix(prefix: str) -> str:
    """A store's URI path prefix as stored: '' or ``/a/b`` ([A-Za-z0-9_-] segments), at most 117 characters."""
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    if not _PREFIX_RE.fullmatch(prefix) or len(prefix) + len(_MARK) > MAX_URI_PATH:
        raise ValueError(
            f"a prefix is segments of A-Z, a-z, 0-9, '_' and '-' separated by '/', at most "
            f"{MAX_URI_PATH - len(_MARK)} characters"
        )
    return prefix


def route(path: str) -> Route:
    """The route of a raw request path, or InvalidUriPathException."""
    if len(path) > 256 or "?" in path:
        raise XksError("InvalidUriPathException", "the URI path is not an XKS API path")
    head, mark, tail = path.rpartition(_MARK + "/")
    if not mark or not _PREFIX_RE.fullmatch(head) or len(head) + len(_MARK) > MAX_URI_PATH:
        raise XksError("InvalidUriPathException", "the URI path is not an XKS API path")
    if tail == "health":
        return Route(head, "health")
    parts = tail.split("/")
    if len(parts) == 3 and parts[0] == "keys" and parts[2] in OPERATIONS:
        if not KEY_ID_RE.fullmatch(parts[1]) or parts[1] in (".", ".."):
            raise XksError("InvalidUriPathException", "the external key id is not 1-128 of [A-Za-z0-9._-]")
        return Route(head, parts[2], parts[1])
    raise XksError("InvalidUriPathException", "the URI path is not an XKS API path")
