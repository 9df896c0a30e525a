"""The XKS site the e2e tests share: a real `keysteward server start` with the XKS listener, a tenant, an
external key store and key, and a botocore SigV4 client for it (tests/e2e/test_xks*.py)."""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.fixtures.keysteward import SecretRegistry, ServerProcess, free_port, init_manager

REGION = "eu-west-1"
POLICY = """
@id("kms-may-use-xks-keys")
permit (
  principal is Keysteward::CloudService,
  action in [Keysteward::Action::"encrypt", Keysteward::Action::"decrypt", Keysteward::Action::"describe_key"],
  resource
);
@id("refuse-reencrypt")
forbid (principal is Keysteward::CloudService, action, resource)
when { context has kms && context.kms.operation == "ReEncrypt" };
@id("decrypt-only-for-ebs")
forbid (principal is Keysteward::CloudService, action == Keysteward::Action::"decrypt", resource)
unless { context has kms && context.kms has via_service && context.kms.via_service == "ebs" };
"""


@dataclass
class Xks:
    port: int
    ca: str
    prefix: str
    akid: str
    secret: str
    region: str = REGION
    cert: tuple[str, str] | None = None

    def url(self, tail: str, prefix: str | None = None) -> str:
        return f"https://127.0.0.1:{self.port}{self.prefix if prefix is None else prefix}/kms/xks/v1/{tail}"

    def call(
        self,
        tail: str,
        body: dict[str, Any] | bytes,
        *,
        prefix: str | None = None,
        akid: str | None = None,
        secret: str | None = None,
        region: str | None = None,
        method: str = "POST",
        tamper: Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]] | None = None,
    ) -> httpx.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = AWSRequest(
            method=method, url=self.url(tail, prefix), data=data, headers={"Content-Type": "application/json"}
        )
        creds = Credentials(akid or self.akid, secret or self.secret)
        SigV4Auth(creds, "kms-xks-proxy", region or self.region).add_auth(request)
        headers = dict(request.headers.items())
        if tamper is not None:
            headers, data = tamper(headers, data)
        ctx = ssl.create_default_context(cafile=self.ca)
        if self.cert is not None:
            ctx.load_cert_chain(*self.cert)
        with httpx.Client(verify=ctx, timeout=10) as client:
            return client.request(method, request.url, headers=headers, content=data)


def meta(operation: str, **more: str) -> dict[str, str]:
    return {
        "awsPrincipalArn": "arn:aws:iam::123456789012:role/ebs",
        "kmsKeyArn": "arn:aws:kms:eu-west-1:1:key/x",
        "kmsOperation": operation,
        "kmsRequestId": str(uuid.uuid4()),
        **more,
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypt_body(plaintext: bytes, aad: bytes | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestMetadata": meta("GenerateDataKey", kmsViaService="ebs"),
        "plaintext": b64(plaintext),
        "encryptionAlgorithm": "AES_GCM",
        **fields,
    }
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    return body


def decrypt_body(enc: dict[str, str], aad: bytes | None = None, **metadata: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestMetadata": meta("Decrypt", **({"kmsViaService": "ebs"} | metadata)),
        "encryptionAlgorithm": "AES_GCM",
        **{k: enc[k] for k in ("ciphertext", "ciphertextMetadata", "initializationVector", "authenticationTag")},
    }
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    return body


def error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["errorName"]


def start_site(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    secret_registry: SecretRegistry,
    env: dict[str, str],
    prefix: str = "acme/ebs",
    usage: tuple[str, ...] = ("--usage", "both"),
) -> tuple[ServerProcess, str, Xks]:
    """A server with the XKS listener (``env`` added), tenant ``acme``, store ``prefix`` and key ``k1``."""
    out = init_manager(tmp_path / "ks", secret_registry)
    port = free_port()
    server = server_factory(tmp_path / "ks", env={"KEYSTEWARD_XKS_LISTEN": f"127.0.0.1:{port}", **env})
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    store = server.cli_json("xks", "store", "create", prefix, "--region", REGION, token=admin)
    assert store["uri_path"] == f"/{prefix}/kms/xks/v1"
    secret_registry.secret(store["secret_access_key"].encode(), "xks secret access key")
    server.cli_json("xks", "key", "create", "k1", "--store", prefix, *usage, token=admin)
    xks = Xks(
        port, str(server.settings.server.tls_ca), f"/{prefix}", store["access_key_id"], store["secret_access_key"]
    )
    return server, admin, xks


@pytest.fixture
def site(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> tuple[ServerProcess, str, Xks]:
    return start_site(tmp_path, server_factory, secret_registry, {"KEYSTEWARD_AUDIT_REFUSAL_INTERVAL": "0.5"})


def put_policy(server: ServerProcess, admin: str) -> None:
    with server.http(admin) as c:
        r = c.put("/policy", json={"sources": {"xks.cedar": POLICY}})
        assert r.status_code == 200, r.text
