"""The devcloud metadata service: each instance's signed identity over plain HTTP (loopback).

Routes, per instance (an instance prefix stands in for the link-local address a real cloud uses):

- ``GET /{id}/latest/dynamic/instance-identity/document?nonce=HEX``: the AWS-shaped JSON document
- ``GET /{id}/latest/dynamic/instance-identity/pkcs7?nonce=HEX``: its PKCS#7 signature (base64 DER)
- ``GET /{id}/computeMetadata/v1/instance/service-accounts/default/identity?audience=A&format=full&nonce=HEX``
  with ``Metadata-Flavor: Google``: the GCP-shaped identity token

An unknown or terminated instance gets 404, a malformed nonce or audience 400, a GCP request without
the flavor header 403. ``GET /`` answers 200 (a readiness probe).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from keysteward.devcloud.provider import DevCloud, check_nonce
from keysteward.errors import BadRequest, Forbidden, KeystewardError, NotFound

log = logging.getLogger(__name__)
_AWS = ("latest", "dynamic", "instance-identity")
_GCP = ("computeMetadata", "v1", "instance", "service-accounts", "default", "identity")


class MetadataServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cloud: DevCloud, host: str, port: int, *, clock: Callable[[], datetime] | None = None) -> None:
        self.cloud = cloud
        self.clock = clock or (lambda: datetime.now(UTC))
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: MetadataServer
    server_version = "keysteward-devcloud"
    sys_version = ""

    def do_GET(self) -> None:
        try:
            status, content_type, body = self._route()
        except KeystewardError as exc:
            status, content_type, body = exc.status, "text/plain", (exc.message + "\n").encode()
        except Exception:  # a bug must not kill the service or leak a traceback to the client
            log.exception("devcloud request failed")
            status, content_type, body = 500, "text/plain", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if "computeMetadata" in self.path:
            self.send_header("Metadata-Flavor", "Google")
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> tuple[int, str, bytes]:
        url = urlsplit(self.path)
        parts = tuple(url.path.strip("/").split("/"))
        if parts == ("",):
            return HTTPStatus.OK, "text/plain", b"keysteward devcloud\n"
        query = _query(url.query)
        instance_id, rest = parts[0], parts[1:]
        if rest[:3] == _AWS and len(rest) == 4 and rest[3] in {"document", "pkcs7"}:
            instance = self.server.cloud.running(instance_id)
            document, signature = self.server.cloud.aws_document(instance, check_nonce(query.get("nonce", "")))
            if rest[3] == "document":
                return HTTPStatus.OK, "application/json", document
            return HTTPStatus.OK, "text/plain", base64.encodebytes(signature)
        if rest == _GCP:
            if self.headers.get("Metadata-Flavor") != "Google":
                raise Forbidden("missing header Metadata-Flavor: Google", code="metadata_flavor")
            instance = self.server.cloud.running(instance_id)
            audience = query.get("audience")
            if not audience:
                raise BadRequest("the audience parameter is required", code="bad_audience")
            fmt = query.get("format", "standard")
            if fmt not in {"standard", "full"}:
                raise BadRequest("format must be standard or full")
            nonce = check_nonce(query.get("nonce", ""))
            token = self.server.cloud.gcp_token(instance, audience, nonce, self.server.clock(), full=fmt == "full")
            return HTTPStatus.OK, "application/jwt", token.encode("ascii")
        raise NotFound("no such metadata path")

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def _query(raw: str) -> dict[str, str]:
    try:
        parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=8)
    except ValueError as exc:
        raise BadRequest("malformed query string") from exc
    if any(len(v) != 1 for v in parsed.values()):
        raise BadRequest("each query parameter may be given once")
    return {k: v[0] for k, v in parsed.items()}
