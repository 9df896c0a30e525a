"""Evidence collection on the instance: its signed identity, from the provider's metadata service.

:func:`collect_identity` asks the metadata service for identity evidence bound to ``binding`` (the
release's ``sha256(nonce || public_key)``) and returns the ``evidence.identity`` object of
keysteward-release/1. Anything that keeps it from doing so (service unreachable, instance unknown or
terminated, an answer that is not what a metadata service gives) raises :class:`EvidenceUnavailable`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Final

import httpx

from keysteward.errors import BadRequest, Unavailable

MAX_ANSWER: Final = 64 * 1024
_AWS_PATH: Final = "/latest/dynamic/instance-identity/"
_GCP_PATH: Final = "/computeMetadata/v1/instance/service-accounts/default/identity"


class EvidenceUnavailable(Unavailable):
    """The instance could not get its evidence from the provider."""

    code = "evidence_unavailable"
    title = "Evidence unavailable"


def collect_identity(
    metadata_url: str, kind: str, binding: bytes, *, audience: str | None, timeout: float = 5.0
) -> dict[str, str]:
    """Fetch identity evidence of ``kind`` ("aws-iid" or "gcp-jwt") bound to ``binding``.

    ``metadata_url`` is the metadata service's base (for the devcloud, the instance's prefix
    ``http://host:port/i-...``); ``audience`` is the key manager's audience (gcp-jwt only).
    """
    if len(binding) != 32:
        raise BadRequest("the binding must be 32 bytes (sha256 of nonce and public key)")
    base = metadata_url.rstrip("/")
    params = {"nonce": binding.hex()}
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        if kind == "aws-iid":
            document = _get(client, base + _AWS_PATH + "document", params, {})
            signature_b64 = _get(client, base + _AWS_PATH + "pkcs7", params, {})
            try:
                json.loads(document)
                signature = base64.b64decode(b"".join(signature_b64.split()), validate=True)
            except (ValueError, binascii.Error) as exc:
                raise EvidenceUnavailable(
                    f"the metadata service at {base} answered something that is not an identity document"
                ) from exc
            return {
                "type": "aws-iid",
                "document": base64.b64encode(document).decode("ascii"),
                "signature": base64.b64encode(signature).decode("ascii"),
            }
        if kind == "gcp-jwt":
            if not audience:
                raise BadRequest("gcp-jwt evidence needs the key manager's audience")
            answer = _get(
                client,
                base + _GCP_PATH,
                {**params, "audience": audience, "format": "full"},
                {"Metadata-Flavor": "Google"},
            )
            try:
                token = answer.decode("ascii").strip()
            except UnicodeDecodeError as exc:
                raise EvidenceUnavailable(
                    f"the metadata service at {base} answered something that is not a token"
                ) from exc
            if token.count(".") != 2:
                raise EvidenceUnavailable(f"the metadata service at {base} answered something that is not a token")
            return {"type": "gcp-jwt", "token": token}
    raise BadRequest("unknown evidence kind (expected aws-iid or gcp-jwt)")


def _get(client: httpx.Client, url: str, params: dict[str, str], headers: dict[str, str]) -> bytes:
    try:
        with client.stream("GET", url, params=params, headers=headers) as response:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER:
                    raise EvidenceUnavailable(f"the metadata service's answer from {url} is over {MAX_ANSWER} bytes")
    except httpx.HTTPError as exc:
        raise EvidenceUnavailable(f"cannot reach the metadata service at {url}: {exc}") from exc
    if response.status_code == 404:
        raise EvidenceUnavailable(f"the metadata service at {url} does not know this instance (404): is it terminated?")
    if response.status_code != 200:
        detail = bytes(body[:200]).decode("utf-8", "replace").strip()
        raise EvidenceUnavailable(f"the metadata service at {url} answered {response.status_code}: {detail}")
    return bytes(body)
