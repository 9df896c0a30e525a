"""The boot unlock's HTTP transport (keysteward.agent.oneshot_http) against real servers: a keysteward
server process over TLS, and small HTTP servers on real sockets that misbehave on purpose.

Each case pins what the agent's failover and its error lines rely on: a refused connection is NOT_SENT,
an answer that never comes is LOST, a certificate not trusted says so, an answer too big is refused, an
idle connection the server dropped is made again, and an HTTP proxy in the environment sends the client
back to httpx (which honours it).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keysteward.agent.client import AgentClient
from keysteward.agent.oneshot_http import OneShotHttp
from keysteward.errors import KeystewardError, Unavailable
from keysteward.kms_failover import LOST, NOT_SENT
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "http_proxy", "all_proxy", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_a_real_server_over_tls(
    tmp_path: Path, secret_registry: SecretRegistry, server_factory: Callable[..., ServerProcess]
) -> None:
    init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    ca = str(server.settings.server.tls_ca)
    with AgentClient(server.url, ca_file=ca, one_shot=True) as client:
        assert client._one_shot and not client._https  # the standard library's transport, no httpx client
        first, second = client.challenge(), client.challenge()  # the second on the kept-alive connection
        assert first.nonce != second.nonce and "x25519" in first.suites
        with pytest.raises(KeystewardError) as caught:  # a problem+json answer keeps the server's code
            client.post("/leases/not-a-lease/renew", {"token": "AAAA"}, safe=True)
        assert caught.value.code != "kms_unreachable"
    with AgentClient(server.url, one_shot=True) as untrusting, pytest.raises(Unavailable) as untrusted:
        untrusting.challenge()  # the system's CAs do not know the test CA
    assert "does not trust" in untrusted.value.message and "--ca-file" in untrusted.value.message
    assert untrusted.value.failover not in (NOT_SENT, LOST)  # another URL would not be trusted either


def test_refused_connection_is_not_sent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening
        with AgentClient(f"http://127.0.0.1:{port}", one_shot=True, timeout=2) as client:
            with pytest.raises(Unavailable) as caught:
                client.challenge()
    assert caught.value.code == "kms_unreachable" and caught.value.failover == NOT_SENT


Handler = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def http_server() -> Iterator[Callable[[Handler], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(handle: Handler) -> str:
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                handle(self)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _answer(handler: BaseHTTPRequestHandler, body: bytes, *, close: bool = False) -> None:
    handler.send_response(200)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()
    if close:  # drops the kept-alive connection without saying so (as an idle timeout does); the client's
        handler.connection.shutdown(socket.SHUT_RDWR)  # next request may leave before the FIN arrives
        handler.close_connection = True


CHALLENGE = b'{"protocol": "keysteward-release/1", "nonce": "AAAA", "suites": ["x25519"], "expires_at": "x"}'


def test_an_idle_connection_the_server_dropped_is_made_again(http_server: Callable[[Handler], str]) -> None:
    seen: list[int] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        seen.append(h.client_address[1])
        _answer(h, CHALLENGE, close=True)

    with AgentClient(http_server(handle), one_shot=True, timeout=5) as client:
        for _ in range(3):
            assert client.challenge().nonce == "AAAA"
    assert len(set(seen)) == 3  # a new connection each time, no failed request


def test_a_request_that_meets_the_drop_on_a_kept_connection_is_asked_once_more(
    http_server: Callable[[Handler], str],
) -> None:
    """The race the idle check cannot see: the server drops a kept-alive connection just as the client sends
    on it. Played without timing: the server answers each connection's first request and hangs up on its
    second without a byte. The client asks again on a new connection, once; a new connection that is
    dropped too is LOST (above)."""
    answered: dict[int, int] = {}

    def first_only(h: BaseHTTPRequestHandler) -> None:
        port = h.client_address[1]
        if port in answered:
            h.close_connection = True  # read the request, answer nothing
            return
        answered[port] = 1
        _answer(h, CHALLENGE)

    with AgentClient(http_server(first_only), one_shot=True, timeout=5) as client:
        for _ in range(3):
            assert client.challenge().nonce == "AAAA"
    assert len(answered) == 3  # each challenge after the first met a drop and was answered on a new connection


def test_no_answer_is_lost_and_a_big_answer_is_refused(http_server: Callable[[Handler], str]) -> None:
    def hang_up(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True  # read the request, answer nothing

    with AgentClient(http_server(hang_up), one_shot=True, timeout=5) as client, pytest.raises(Unavailable) as lost:
        client.challenge()
    assert lost.value.code == "kms_unreachable" and lost.value.failover == LOST

    def too_big(h: BaseHTTPRequestHandler) -> None:
        _answer(h, b'{"pad": "' + b"x" * (2 << 20) + b'"}')

    with AgentClient(http_server(too_big), one_shot=True, timeout=5) as client, pytest.raises(KeystewardError) as big:
        client.challenge()
    assert big.value.code == "kms_protocol" and "over 1048576 bytes" in big.value.message

    def not_json(h: BaseHTTPRequestHandler) -> None:
        _answer(h, b"<html>hello</html>")

    with AgentClient(http_server(not_json), one_shot=True) as client, pytest.raises(KeystewardError) as junk:
        client.challenge()
    assert junk.value.code == "kms_protocol" and "without JSON" in junk.value.message


def test_a_proxy_in_the_environment_keeps_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OneShotHttp.usable({}) and OneShotHttp.usable({"HTTPS_PROXY": ""})
    assert not OneShotHttp.usable({"HTTPS_PROXY": "http://proxy:3128"})
    assert not OneShotHttp.usable({"all_proxy": "socks5://proxy"})
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with AgentClient("https://kms.example:8443", one_shot=True) as client:
        assert client._https and not client._one_shot
