"""The one translation of keysteward's HTTP answers into errors, shared by the CLI and the agent."""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from keysteward.agent.client import AgentClient
from keysteward.api_errors import MAX_CODE, MAX_DETAIL, answer_error, transport_error
from keysteward.cli.client import Client, ClientOptions
from keysteward.errors import Conflict, Denied, Forbidden, KeystewardError, NotFound, Unavailable


def test_answers_below_400_are_no_error() -> None:
    assert answer_error(200, {"x": 1}, "OK", "https://kms") is None
    assert answer_error(399, None, "", "https://kms") is None


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (404, {"code": "volume_not_found", "detail": "no volume"}, NotFound, "volume_not_found"),
        (409, {"code": "policy_lockout", "detail": "x"}, Conflict, "policy_lockout"),
        (403, {"code": "role_forbidden", "detail": "x"}, Forbidden, "role_forbidden"),
        (403, {"code": "no_permit", "detail": "x", "decision": "denied"}, Denied, "no_permit"),
        (418, {"code": "teapot"}, KeystewardError, "teapot"),
        (502, None, KeystewardError, "http_error"),  # a proxy's HTML page: no JSON
        (400, ["not", "an", "object"], KeystewardError, "http_error"),
        (400, {"code": None, "detail": None}, KeystewardError, "http_error"),
    ],
)
def test_problem_answers_become_the_error_of_their_status(status: int, body: object, cls: type, code: str) -> None:
    error = answer_error(status, body, "Reason", "https://kms")
    assert isinstance(error, cls) and error.code == code and error.status == status


def test_server_errors_are_unavailable_for_a_client_that_retries() -> None:
    error = answer_error(503, {"code": "sealed", "detail": "sealed"}, "Service Unavailable", "https://kms",
                         unavailable_code="kms_unreachable")  # fmt: skip
    assert isinstance(error, Unavailable) and error.code == "kms_unreachable" and "503" in error.message
    # a 4xx stays what it is, even for that client
    assert isinstance(answer_error(404, {"code": "x"}, "", "u", unavailable_code="kms_unreachable"), NotFound)


def test_hostile_answers_are_bounded() -> None:
    error = answer_error(400, {"code": "c" * 10_000, "detail": "d" * 1_000_000}, "", "https://kms")
    assert error is not None and len(error.code) == MAX_CODE and len(error.message) == MAX_DETAIL


# -- against a real TLS server whose certificate the client does not trust ------------------------------


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def untrusted_url(tmp_path: Path) -> Iterator[str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_untrusted_certificate_is_named_by_both_clients(untrusted_url: str) -> None:
    cli = Client(ClientOptions(url=untrusted_url, token=None, ca_file=None, cert=None, key=None, timeout=5))
    with pytest.raises(Unavailable) as info:
        cli.get("/health")
    assert info.value.code == "server_unreachable" and "--ca-file" in info.value.message
    with AgentClient(untrusted_url, timeout=5) as agent, pytest.raises(Unavailable) as info:
        agent.challenge()
    assert info.value.code == "kms_unreachable" and "does not trust" in info.value.message


def test_no_answer_at_all() -> None:
    error = transport_error(httpx.ConnectError("refused"), "https://127.0.0.1:1", "server_unreachable")
    assert error.code == "server_unreachable" and "cannot reach" in error.message
