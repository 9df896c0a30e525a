"""The devcloud metadata service over real HTTP, and the agent's evidence collection against it."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from keysteward.agent.evidence import EvidenceUnavailable, collect_identity
from keysteward.attest.binding import binding
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.identity import ProviderTrust, verify_identity
from keysteward.devcloud.provider import DevCloud
from keysteward.devcloud.server import MetadataServer
from keysteward.errors import BadRequest

pytestmark = pytest.mark.integration

AUD = "https://kms.example:8443"
GCP = "/computeMetadata/v1/instance/service-accounts/default/identity"
AWS = "/latest/dynamic/instance-identity/"


@pytest.fixture
def cloud(tmp_path: Path) -> DevCloud:
    return DevCloud.init(tmp_path / "state")


@pytest.fixture
def service(cloud: DevCloud) -> Iterator[MetadataServer]:
    server = MetadataServer(DevCloud(cloud.state), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def trusts(cloud: DevCloud) -> list[ProviderTrust]:
    return [
        ProviderTrust.from_pem("devcloud", "aws-iid", cloud.certificate_pem(), None),
        ProviderTrust.from_pem("devcloud", "gcp-jwt", cloud.certificate_pem(), AUD),
    ]


@pytest.mark.parametrize("kind", ["aws-iid", "gcp-jwt"])
def test_collect_then_verify(cloud: DevCloud, service: MetadataServer, trusts: list[ProviderTrust], kind: str) -> None:
    instance = cloud.create(account="123456789012")  # made after the service started: it re-reads its state
    bind = binding(os.urandom(41), os.urandom(32))
    evidence = collect_identity(f"{service.url}/{instance.id}", kind, bind, audience=AUD)
    assert evidence["type"] == kind
    assert set(evidence) == ({"type", "document", "signature"} if kind == "aws-iid" else {"type", "token"})
    identity = verify_identity(evidence, trusts, binding=bind, now=datetime.now(UTC), audience=AUD)
    assert identity.key() == f"devcloud/123456789012/{instance.id}"
    # the same evidence is worthless for another binding (another nonce or HPKE key)
    other = binding(os.urandom(41), os.urandom(32))
    with pytest.raises(EvidenceRejected) as info:
        verify_identity(evidence, trusts, binding=other, now=datetime.now(UTC), audience=AUD)
    assert info.value.code == "binding_mismatch"


def test_evidence_of_another_devcloud_is_refused(cloud: DevCloud, service: MetadataServer, tmp_path: Path) -> None:
    other = DevCloud.init(tmp_path / "other")
    instance = cloud.create()
    bind = os.urandom(32)
    evidence = collect_identity(f"{service.url}/{instance.id}", "aws-iid", bind, audience=None)
    trusts = [ProviderTrust.from_pem("other", "aws-iid", other.certificate_pem(), None)]
    with pytest.raises(EvidenceRejected, match="does not verify with any certificate of provider 'other'"):
        verify_identity(evidence, trusts, binding=bind, now=datetime.now(UTC), audience=AUD)


def test_terminated_and_unknown_instances_get_404(cloud: DevCloud, service: MetadataServer) -> None:
    instance = cloud.create()
    nonce = "cd" * 32
    url = f"{service.url}/{instance.id}{AWS}document"
    assert httpx.get(url, params={"nonce": nonce}).status_code == 200
    cloud.terminate(instance.id)
    for path, headers in ((f"{AWS}document", {}), (f"{AWS}pkcs7", {}), (GCP, {"Metadata-Flavor": "Google"})):
        answer = httpx.get(
            f"{service.url}/{instance.id}{path}", params={"nonce": nonce, "audience": AUD}, headers=headers
        )
        assert answer.status_code == 404, path
        assert "terminated" in answer.text
    assert httpx.get(f"{service.url}/i-00000000000000000{AWS}document", params={"nonce": nonce}).status_code == 404
    with pytest.raises(EvidenceUnavailable) as info:
        collect_identity(f"{service.url}/{instance.id}", "aws-iid", os.urandom(32), audience=None)
    assert info.value.code == "evidence_unavailable" and "404" in info.value.message


def test_requests_the_service_refuses(cloud: DevCloud, service: MetadataServer) -> None:
    instance = cloud.create()
    base = f"{service.url}/{instance.id}"
    flavor = {"Metadata-Flavor": "Google"}
    for nonce in ("", "xyz", "AB" * 32, "ab" * 33):
        assert httpx.get(f"{base}{AWS}document", params={"nonce": nonce}).status_code == 400
        assert httpx.get(base + GCP, params={"nonce": nonce, "audience": AUD}, headers=flavor).status_code == 400
    assert httpx.get(f"{base}{AWS}document").status_code == 400
    good = {"nonce": "ab" * 32, "audience": AUD, "format": "full"}
    assert httpx.get(base + GCP, params=good).status_code == 403  # no Metadata-Flavor header
    assert httpx.get(base + GCP, params={**good, "audience": ""}, headers=flavor).status_code == 400
    assert httpx.get(base + GCP, params={**good, "format": "x"}, headers=flavor).status_code == 400
    assert httpx.get(f"{base}{AWS}document?nonce={'ab' * 32}&nonce={'cd' * 32}").status_code == 400
    assert httpx.get(f"{base}/latest/meta-data/").status_code == 404
    answer = httpx.get(base + GCP, params=good, headers=flavor)
    assert answer.status_code == 200 and answer.headers["metadata-flavor"] == "Google"
    assert httpx.get(service.url + "/").status_code == 200


def test_aws_answers_match(cloud: DevCloud, service: MetadataServer) -> None:
    """The document and the PKCS#7 come from two requests: the second signs the same bytes as the first."""
    instance = cloud.create()
    params = {"nonce": "ef" * 32}
    document = httpx.get(f"{service.url}/{instance.id}{AWS}document", params=params).content
    pkcs7 = httpx.get(f"{service.url}/{instance.id}{AWS}pkcs7", params=params).text
    assert json.loads(document)["instanceId"] == instance.id
    assert document in base64.b64decode("".join(pkcs7.split()))


def test_unreachable_service() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(EvidenceUnavailable, match="cannot reach the metadata service"):
            collect_identity(f"http://127.0.0.1:{port}/i-1", "aws-iid", os.urandom(32), audience=None, timeout=2)


def test_agent_refuses_bad_arguments(service: MetadataServer) -> None:
    with pytest.raises(BadRequest, match="unknown evidence kind"):
        collect_identity(service.url, "tpm2", os.urandom(32), audience=None)
    with pytest.raises(BadRequest, match="audience"):
        collect_identity(service.url, "gcp-jwt", os.urandom(32), audience=None)
    with pytest.raises(BadRequest, match="32 bytes"):
        collect_identity(service.url, "aws-iid", b"short", audience=None)


def test_agent_refuses_answers_that_are_not_evidence(tmp_path: Path) -> None:
    """A metadata endpoint that answers 200 with junk or with too much is not believed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Junk(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"x" * (70 * 1024) if "big" in self.path else b"<html>not metadata</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Junk)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(EvidenceUnavailable, match="not an identity document"):
            collect_identity(base, "aws-iid", os.urandom(32), audience=None)
        with pytest.raises(EvidenceUnavailable, match="not a token"):
            collect_identity(base, "gcp-jwt", os.urandom(32), audience=AUD)
        with pytest.raises(EvidenceUnavailable, match="over 65536 bytes"):
            collect_identity(base + "/big", "gcp-jwt", os.urandom(32), audience=AUD)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("url", ["ftp://169.254.169.254", "http://169.254.169.254:99999", "no-scheme/i-1", "http://"])
def test_a_metadata_url_that_is_not_one_is_refused(url: str) -> None:
    """The metadata URL is parsed before anything is sent: a bad one is a BadRequest, never a traceback."""
    with pytest.raises(BadRequest, match="metadata URL"):
        collect_identity(url, "aws-iid", os.urandom(32), audience=None, timeout=1)
