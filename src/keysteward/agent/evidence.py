"""Evidence collection on the instance: its signed identity, from the provider's metadata service.

:func:`collect_identity` asks the metadata service for identity evidence bound to ``binding`` (the
release's ``sha256(nonce || public_key)``) and returns the ``evidence.identity`` object of
keysteward-release/1. Anything that keeps it from doing so (service unreachable, instance unknown or
terminated, an answer that is not what a metadata service gives) raises :class:`EvidenceUnavailable`.

The metadata service is asked with the standard library's :mod:`http.client`, not httpx: this runs in
every boot unlock, and an httpx client costs its import and a TLS context loaded with the system's CA
bundle, for a service that answers plain HTTP on a link-local address (an ``https://`` metadata URL is
still verified against the system's CAs). No redirect is followed.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
from typing import Final
from urllib.parse import urlencode, urlsplit

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
    client = _connection(base, timeout)
    try:
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
    finally:
        client.close()
    raise BadRequest("unknown evidence kind (expected aws-iid or gcp-jwt)")


def _connection(base: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to the metadata service at ``base`` (opened by the first request)."""
    try:
        parts = urlsplit(base)
        port = parts.port
    except ValueError:
        raise BadRequest(f"the metadata URL {base[:80]!r} has a port that is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"the metadata URL {base[:80]!r} is not an http:// or https:// URL")
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, port, timeout=timeout)
    return http.client.HTTPConnection(parts.hostname, port, timeout=timeout)


def _get(client: http.client.HTTPConnection, url: str, params: dict[str, str], headers: dict[str, str]) -> bytes:
    target = urlsplit(url)._replace(scheme="", netloc="", query=urlencode(params)).geturl()
    try:
        client.request("GET", target, headers=headers)
        response = client.getresponse()
        body = response.read(MAX_ANSWER + 1)
        if len(body) > MAX_ANSWER:
            client.close()
            raise EvidenceUnavailable(f"the metadata service's answer from {url} is over {MAX_ANSWER} bytes")
        if not response.isclosed():
            response.read()  # the connection serves the next request
    except (OSError, http.client.HTTPException) as exc:
        client.close()
        raise EvidenceUnavailable(f"cannot reach the metadata service at {url}: {exc}") from exc
    if response.status == 404:
        raise EvidenceUnavailable(f"the metadata service at {url} does not know this instance (404): is it terminated?")
    if response.status != 200:
        detail = body[:200].decode("utf-8", "replace").strip()
        raise EvidenceUnavailable(f"the metadata service at {url} answered {response.status}: {detail}")
    return body
