"""keysteward as an AWS KMS external key store proxy, against a real `keysteward server start`.

The peers are real SigV4 clients: botocore (``AWSRequest`` signed by ``SigV4Auth``, sent with httpx) and
``curl --aws-sigv4``. Every call goes through the tenant's Cedar policy and the audit log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.auth
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysteward.crypto import x509ca
from tests.e2e.test_secret_scan import _files, _forms, _scan
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, free_port, init_manager
from tests.support import xks_site
from tests.support.xks_site import REGION, Xks, b64, decrypt_body, encrypt_body, error, meta, put_policy, start_site

pytestmark = pytest.mark.e2e
site = xks_site.site  # the fixture


def test_botocore_peer_metadata_encrypt_decrypt_under_the_tenant_policy(
    site: tuple[ServerProcess, str, Xks],
    secret_registry: SecretRegistry,
) -> None:
    server, admin, xks = site
    health = xks.call("health", {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "h1"}})
    assert health.status_code == 200, health.text
    assert health.json()["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE" and health.json()["xksProxyFleetSize"] == 1

    # no policy permits a CloudService yet: refused, and the refusal is audited
    first = xks.call("keys/k1/metadata", {"requestMetadata": meta("CreateKey")})
    assert error(first) == (403, "AccessDeniedException")
    put_policy(server, admin)
    r = xks.call("keys/k1/metadata", {"requestMetadata": meta("CreateKey")})
    assert r.status_code == 200 and r.json() == {
        "keySpec": "AES_256",
        "keyUsage": ["ENCRYPT", "DECRYPT"],
        "keyStatus": "ENABLED",
    }

    plaintext, aad = os.urandom(4300), os.urandom(8192)
    secret_registry.secret(plaintext, "xks plaintext")
    r = xks.call("keys/k1/encrypt", encrypt_body(plaintext, aad, ciphertextDataIntegrityValueAlgorithm="SHA_256"))
    assert r.status_code == 200, r.text
    enc = r.json()
    fields = [
        base64.b64decode(enc[k])
        for k in ("ciphertextMetadata", "initializationVector", "ciphertext", "authenticationTag")
    ]
    assert len(fields[1]) == 12 and len(fields[2]) == 4300 and len(fields[3]) == 16 and len(fields[0]) <= 20
    assert base64.b64decode(enc["ciphertextDataIntegrityValue"]) == hashlib.sha256(aad + b"".join(fields)).digest()

    r = xks.call("keys/k1/decrypt", decrypt_body(enc, aad))
    assert r.status_code == 200 and base64.b64decode(r.json()["plaintext"]) == plaintext
    assert error(xks.call("keys/k1/decrypt", decrypt_body(enc, aad[:-1]))) == (400, "InvalidCiphertextException")
    moved = {**enc, "ciphertextMetadata": b64(b"ks1\x00\x00\x00\x02")}
    assert error(xks.call("keys/k1/decrypt", decrypt_body(moved, aad))) == (400, "InvalidCiphertextException")
    # the metadata passed back as AAD (the confusion the spec's length framing prevents)
    no_aad = xks.call("keys/k1/encrypt", encrypt_body(b"x" * 32)).json()
    confused = {**no_aad, "ciphertextMetadata": b64(b"")}
    assert error(
        xks.call("keys/k1/decrypt", decrypt_body(confused, base64.b64decode(no_aad["ciphertextMetadata"])))
    ) == (400, "InvalidCiphertextException")

    # the tenant's policy on requestMetadata: no ReEncrypt, decrypt only via EBS; the reason is in the audit log
    denied = xks.call(
        "keys/k1/decrypt", {**decrypt_body(enc, aad), "requestMetadata": meta("ReEncrypt", kmsViaService="ebs")}
    )
    assert error(denied) == (403, "AccessDeniedException") and "refuse-reencrypt" in denied.json()["errorMessage"]
    s3 = decrypt_body(enc, aad, kmsViaService="s3")
    assert error(xks.call("keys/k1/decrypt", s3)) == (403, "AccessDeniedException")
    request_id = s3["requestMetadata"]["kmsRequestId"]
    found = server.cli_json("audit", "list", "--kms-request-id", request_id, token=admin)
    assert len(found) == 1 and found[0]["outcome"] == "denied" and found[0]["action"] == "xks.decrypt"
    assert found[0]["actor"] == f"xks:acme/kms/{xks.akid}" and found[0]["details"]["latency_ms"] > 0
    assert "decrypt-only-for-ebs" in found[0]["details"]["policies"]
    # an operation KMS may add later is accepted by the proxy (and decided by the policy)
    assert (
        xks.call("keys/k1/encrypt", {**encrypt_body(b"y"), "requestMetadata": meta("BulkEncrypt")}).status_code == 200
    )

    # unknown key; usage; disable; rotation
    assert error(xks.call("keys/nope/metadata", {"requestMetadata": meta("DescribeKey")})) == (
        404,
        "KeyNotFoundException",
    )
    server.cli_json("xks", "key", "create", "enc-only", "--store", "acme/ebs", "--usage", "encrypt", token=admin)
    only = xks.call("keys/enc-only/encrypt", encrypt_body(b"z" * 32)).json()
    assert error(xks.call("keys/enc-only/decrypt", decrypt_body(only))) == (400, "InvalidKeyUsageException")
    server.cli_json("xks", "key", "disable", "k1", "--store", "acme/ebs", token=admin)
    time.sleep(1.2)
    r = xks.call("keys/k1/metadata", {"requestMetadata": meta("DescribeKey")})
    assert r.json()["keyStatus"] == "DISABLED"
    assert error(xks.call("keys/k1/encrypt", encrypt_body(b"a" * 16))) == (400, "InvalidStateException")
    server.cli_json("xks", "key", "enable", "k1", "--store", "acme/ebs", token=admin)
    server.cli_json("key", "rotate", "k1", token=admin)
    time.sleep(1.2)
    again = xks.call("keys/k1/encrypt", encrypt_body(b"b" * 16)).json()
    assert base64.b64decode(again["ciphertextMetadata"]) == b"ks1\x00\x00\x00\x02"
    assert base64.b64decode(xks.call("keys/k1/decrypt", decrypt_body(enc, aad)).json()["plaintext"]) == plaintext
    upper = server.cli_json("xks", "key", "create", "B42C7FBF-DE61.x_1", "--store", "acme/ebs", token=admin)
    assert upper["key"] == "b42c7fbf-de61.x_1"
    assert xks.call("keys/B42C7FBF-DE61.x_1/metadata", {"requestMetadata": meta("CreateKey")}).status_code == 200
    listed = server.cli_json("xks", "key", "list", "--store", "acme/ebs", token=admin)
    assert {k["id"]: k["usage"] for k in listed} == {"k1": "both", "enc-only": "encrypt", "B42C7FBF-DE61.x_1": "both"}

    # neither the plaintext nor the SigV4 secret lies in the database, its WAL or the server's log
    needles = [
        (form, label)
        for secret, label in [(plaintext, "plaintext"), (xks.secret.encode(), "sigv4 secret")]
        for form in _forms(secret)
    ]
    assert _scan(_files([server.data_dir]), needles) == []

    # crypto-shredding: destroying the tenant key makes every ciphertext of the external key unreadable
    server.cli_json("key", "destroy", "k1", "--yes", token=admin)
    time.sleep(1.2)
    assert error(xks.call("keys/k1/decrypt", decrypt_body(enc, aad))) == (400, "InvalidStateException")
    assert xks.call("keys/k1/metadata", {"requestMetadata": meta("DescribeKey")}).json()["keyStatus"] == "DISABLED"


def test_authentication_and_bad_input(
    site: tuple[ServerProcess, str, Xks],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, admin, xks = site
    put_policy(server, admin)
    body = encrypt_body(b"p" * 32)
    assert xks.call("keys/k1/encrypt", body).status_code == 200

    def unauth(r: httpx.Response) -> None:
        assert error(r) == (401, "AuthenticationFailedException"), r.text

    unauth(xks.call("keys/k1/encrypt", body, secret=xks.secret[:-3] + "AA="))  # wrong signature
    unauth(xks.call("keys/k1/encrypt", body, akid="A" * 24))  # unknown access key id
    unauth(xks.call("keys/k1/encrypt", body, region="us-east-1"))  # wrong region in the scope
    unauth(xks.call("keys/k1/encrypt", body, tamper=lambda h, d: (h, d.replace(b"GenerateDataKey", b"Encrypt"))))
    unauth(
        xks.call("keys/k1/encrypt", body, tamper=lambda h, d: ({k: v for k, v in h.items() if k != "Authorization"}, d))
    )
    # a request signed six minutes ago (a replay past the skew window), and one from the future
    for skew in (-6, 6):
        stamp = datetime.now(UTC) + timedelta(minutes=skew)
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda stamp=stamp: stamp)
        unauth(xks.call("keys/k1/encrypt", body))
    monkeypatch.undo()
    # refused signatures are counted into the store tenant's audit log (one record per interval, not one each)
    time.sleep(1.0)
    counted = [
        r
        for r in server.cli_json("audit", "list", "--outcome", "denied", token=admin)
        if r["action"] == "xks.encrypt" and r["reason"] == "authentication_failed"
    ]
    assert counted and sum(r["details"]["count"] for r in counted) == 7 and counted[0]["actor"] == "anonymous"

    # a second store of another tenant: prefix A's credential never reaches prefix B, nor the other way
    with server.http(admin) as c:
        other = c.post("/xks/stores", json={"prefix": "globex", "region": REGION}).json()
    unauth(xks.call("keys/k1/encrypt", body, prefix="/globex"))
    unauth(xks.call("keys/k1/encrypt", body, akid=other["access_key_id"], secret=other["secret_access_key"]))

    # two credentials at once, then retire the first without a restart
    second = server.cli_json("xks", "credential", "add", "--store", "acme/ebs", token=admin)
    assert (
        xks.call("keys/k1/encrypt", body, akid=second["access_key_id"], secret=second["secret_access_key"]).status_code
        == 200
    )
    assert xks.call("keys/k1/encrypt", body).status_code == 200
    piped = server.cli("xks", "credential", "retire", xks.akid, token=admin, check=False, input="y\n")
    assert piped.returncode != 0 and "confirmation_required" in piped.stderr  # a piped "y" is not a confirmation
    time.sleep(1.2)
    assert xks.call("keys/k1/encrypt", body).status_code == 200
    server.cli_json("xks", "credential", "retire", xks.akid, "--yes", token=admin)
    time.sleep(1.2)
    unauth(xks.call("keys/k1/encrypt", body))
    assert (
        xks.call("keys/k1/encrypt", body, akid=second["access_key_id"], secret=second["secret_access_key"]).status_code
        == 200
    )
    creds = server.cli_json("xks", "credential", "list", "--store", "acme/ebs", token=admin)
    assert [c["active"] for c in creds] == [False, True] and "secret_access_key" not in json.dumps(creds)
    xks.akid, xks.secret = second["access_key_id"], second["secret_access_key"]

    # paths and methods
    assert error(xks.call("keys/k1/sign", body)) == (404, "InvalidUriPathException")
    assert error(xks.call("keys/k1/encrypt", body, prefix="/nobody")) == (404, "InvalidUriPathException")
    for method in ("GET", "PUT", "DELETE"):
        r = xks.call("keys/k1/encrypt", b"" if method == "GET" else body, method=method)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
    # bodies: truncated JSON, too large, unsupported algorithm, plaintext over the limit
    assert error(xks.call("keys/k1/encrypt", json.dumps(body).encode()[:-5])) == (400, "ValidationException")
    assert error(xks.call("keys/k1/encrypt", b"{" + b" " * 70000 + b"}")) == (400, "ValidationException")
    assert error(xks.call("keys/k1/encrypt", {**body, "encryptionAlgorithm": "RSA"})) == (
        501,
        "UnsupportedOperationException",
    )
    big = encrypt_body(b"q" * 5000)
    assert error(xks.call("keys/k1/encrypt", big)) == (501, "UnsupportedOperationException")
    msg = xks.call("keys/k1/encrypt", b"\xff").json()["errorMessage"]
    assert len(msg) < 512 and all(" " <= ch <= "~" for ch in msg)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.binary(max_size=300)
        | st.builds(
            lambda v: json.dumps(v).encode(),
            st.dictionaries(
                st.sampled_from(
                    [
                        "requestMetadata",
                        "plaintext",
                        "ciphertext",
                        "encryptionAlgorithm",
                        "initializationVector",
                        "authenticationTag",
                        "ciphertextMetadata",
                    ]
                ),
                st.none()
                | st.integers()
                | st.text(max_size=30)
                | st.dictionaries(st.text(max_size=8), st.text(max_size=8)),
            ),
        )
    )
    def fuzz(raw: bytes) -> None:
        for op in ("encrypt", "decrypt", "metadata"):
            r = xks.call(f"keys/k1/{op}", raw)
            assert r.status_code in (400, 403, 404, 501), (r.status_code, r.text)
            assert r.json()["errorName"] in (
                "ValidationException",
                "InvalidCiphertextException",
                "UnsupportedOperationException",
                "AccessDeniedException",
            )

    fuzz()
    assert server.proc is not None and server.proc.poll() is None


def test_curl_aws_sigv4_peer(site: tuple[ServerProcess, str, Xks]) -> None:
    server, admin, xks = site
    put_policy(server, admin)

    def curl(tail: str, body: dict[str, Any], secret: str) -> tuple[int, Any]:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--aws-sigv4",
                f"aws:amz:{REGION}:kms-xks-proxy",
                "--user",
                f"{xks.akid}:{secret}",
                "--cacert",
                xks.ca,
                "-X",
                "POST",
                "-H",
                "Content-Type:application/json",
                "--data",
                json.dumps(body),
                "-w",
                "\n%{http_code}",
                xks.url(tail),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        text, _, status = out.stdout.rpartition("\n")
        return int(status), json.loads(text)

    status, health = curl(
        "health", {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "c"}}, xks.secret
    )
    assert status == 200 and health["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE"
    status, enc = curl("keys/k1/encrypt", encrypt_body(b"hello from curl", b"ctx"), xks.secret)
    assert status == 200, enc
    status, dec = curl("keys/k1/decrypt", decrypt_body(enc, b"ctx"), xks.secret)
    assert status == 200 and base64.b64decode(dec["plaintext"]) == b"hello from curl"
    status, refused = curl("keys/k1/encrypt", encrypt_body(b"x"), xks.secret[:-3] + "AA=")
    assert (status, refused["errorName"]) == (401, "AuthenticationFailedException")


def test_quota_and_metrics(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    port = free_port()
    server = server_factory(
        tmp_path / "ks", env={"KEYSTEWARD_XKS_LISTEN": f"127.0.0.1:{port}", "KEYSTEWARD_XKS_QUOTA_TPS": "3"}
    )
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    store = server.cli_json("xks", "store", "create", "q", "--region", REGION, token=admin)
    xks = Xks(port, str(server.settings.server.tls_ca), "/q", store["access_key_id"], store["secret_access_key"])
    health = {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "q"}}
    codes = [xks.call("health", health).status_code for _ in range(10)]
    assert codes[0] == 200 and 429 in codes
    throttled = xks.call("health", health)
    if throttled.status_code == 429:
        assert throttled.json()["errorName"] == "ThrottlingException"
    with server.http(out.root_token.secret) as c:
        text = c.get(server.url + "/metrics").text
    assert 'keysteward_xks_request_seconds_count{operation="health",outcome="ThrottlingException"}' in text


def _client_cert(tmp: Path, ca_pem: str, ca_key: bytearray, name: str) -> tuple[str, str]:
    issued = x509ca.issue_client_cert(ca_pem, ca_key, tenant="aws", role="agent", name=name)
    assert issued.key_pem is not None
    (tmp / f"{name}.pem").write_text(issued.cert_pem)
    (tmp / f"{name}.key").write_bytes(bytes(issued.key_pem))
    return str(tmp / f"{name}.pem"), str(tmp / f"{name}.key")


def test_mtls_health_when_slow_and_when_sealed(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    ca_pem, ca_key = x509ca.new_ca("Amazon stand-in CA")
    (tmp_path / "kms-ca.pem").write_text(ca_pem)
    kms = _client_cert(tmp_path, ca_pem, ca_key, f"cks.kms.{REGION}.amazonaws.com")
    other = _client_cert(tmp_path, ca_pem, ca_key, "someone.example.com")
    port = free_port()
    env = {
        "KEYSTEWARD_XKS_LISTEN": f"127.0.0.1:{port}",
        "KEYSTEWARD_XKS_MTLS_CA": str(tmp_path / "kms-ca.pem"),
        "KEYSTEWARD_XKS_MTLS_SUBJECT": f"cks.kms.{REGION}.amazonaws.com",
        "KEYSTEWARD_XKS_SLOW_DATABASE_MS": "0",
    }
    server = server_factory(tmp_path / "ks", env=env)
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    store = server.cli_json("xks", "store", "create", "m", "--region", REGION, token=admin)
    xks = Xks(port, str(server.settings.server.tls_ca), "/m", store["access_key_id"], store["secret_access_key"])
    health = {"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "m"}}
    with pytest.raises(httpx.TransportError):  # no client certificate: the handshake fails
        xks.call("health", health)
    xks.cert = other
    assert error(xks.call("health", health)) == (401, "AuthenticationFailedException")
    xks.cert = kms
    r = xks.call("health", health)
    # a database read slower than slow_database_ms (0 here) is reported, not hidden
    assert r.status_code == 200 and r.json()["ekmFleetDetails"][0]["healthStatus"] == "DEGRADED"
    with server.http(out.root_token.secret) as c:
        assert c.post("/sys/seal").status_code == 200
    sealed = xks.call("health", health)
    assert sealed.status_code == 200 and sealed.json()["ekmFleetDetails"][0]["healthStatus"] == "DEGRADED"
    assert error(xks.call("keys/k/encrypt", encrypt_body(b"x"))) == (500, "InternalException")


def test_every_worker_serves_xks_and_sees_a_retired_credential(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    env = {"KEYSTEWARD_SERVER_WORKERS": "2"}
    server, admin, xks = start_site(tmp_path, server_factory, secret_registry, env, prefix="w", usage=())
    put_policy(server, admin)
    port = xks.port
    # both worker processes listen on the XKS port, each on its own socket
    listening = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    assert len({line.split("pid=")[1].split(",")[0] for line in listening.stdout.splitlines()}) == 2, listening.stdout
    # one connection per call: the kernel spreads them over both workers' sockets
    sealed = [xks.call("keys/k1/encrypt", encrypt_body(os.urandom(32))) for _ in range(16)]
    assert [r.status_code for r in sealed] == [200] * 16
    # each worker opens what any worker sealed (they share the database, not memory)
    opened = [xks.call("keys/k1/decrypt", decrypt_body(r.json())) for r in sealed]
    assert [r.status_code for r in opened] == [200] * 16
    server.cli_json("xks", "credential", "retire", xks.akid, "--yes", token=admin)
    time.sleep(1.2)
    refused = [xks.call("keys/k1/encrypt", encrypt_body(b"x")) for _ in range(12)]
    assert {error(r) for r in refused} == {(401, "AuthenticationFailedException")}
