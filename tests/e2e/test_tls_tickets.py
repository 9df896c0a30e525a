"""TLS sessions shared by a server's workers, against a real ``keysteward server start`` with two workers: the
REST port's tickets (keysteward/server/tls_tickets.py), KMIP's sessions held in the workers' shared store
(keysteward/server/tls_sessions.py):

- a session begun at one worker resumes at the other: every one of 40 new REST connections resumes, and
  /health shows both workers answered them (with each worker's own keys about half would not);
- a KMIP client (vCenter's habit: a new connection per operation) resumes on every connection, with TLS 1.2
  (by session id: the KMIP port issues no ticket) and TLS 1.3;
- a ticket from the REST port resumes nothing at the KMIP port: without a certificate that handshake fails;
- a resumed session does not outlive its certificate: after ``ca revoke`` the resumed connections are refused.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn, aes_256_template
from tests.support.kmip_site import KmipSite, make_kmip_site
from tests.support.workers import wait_all_serving

pytestmark = pytest.mark.e2e
REVOCATION_SECONDS = 1.0 + 2.0
"""The servers' one-second certificate cache, and a margin for a loaded machine."""


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(tmp_path, server_factory, secret_registry, env={"KEYSTEWARD_SERVER_WORKERS": "2"})


def _health(site: KmipSite, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[int, ssl.SSLSocket]:
    """GET /v1/health on a new connection (resuming ``session`` when given): the answering process and the socket,
    still open."""
    raw = socket.create_connection(("127.0.0.1", site.server.settings.server.listen_port), timeout=20)
    sock = ctx.wrap_socket(raw, session=session)
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection before its answer"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection inside the answer"
        body += chunk
    return int(json.loads(body)["process"]), sock


def test_a_session_begun_at_one_worker_resumes_at_the_other(site: KmipSite) -> None:
    wait_all_serving(site.server)
    ctx = site.tls(None)
    first, sock = _health(site, ctx, None)
    session = sock.session
    sock.close()
    assert session is not None
    processes, resumed, held = {first}, 0, []
    try:
        for _ in range(40):  # kept open, so the worker holding the fewest takes the next one
            process, sock = _health(site, ctx, session)
            held.append(sock)
            processes.add(process)
            resumed += sock.session_reused
    finally:
        for sock in held:
            sock.close()
    assert len(processes) == 2, "40 connections held open all went to one worker"
    assert resumed == 40


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_kmip_clients_resume_on_every_connection_until_their_certificate_is_revoked(
    site: KmipSite, version: ssl.TLSVersion
) -> None:
    cert, key, _ = site.issue("esx-1")
    ctx = site.tls((cert, key))
    ctx.maximum_version = version
    site.wait_served(ctx)
    with KmipConn(site.port, ctx) as c:
        assert c.one("Create", *aes_256_template()).ok
        session = c.sock.session
    assert session is not None
    assert session.has_ticket == (version == ssl.TLSVersion.TLSv1_3)  # TLS 1.3's names a session held here
    resumed = 0
    for _ in range(30):
        with KmipConn(site.port, ctx, session=session) as c:
            assert c.one("Create", *aes_256_template()).ok
            resumed += c.sock.session_reused
    assert resumed == 30

    # a ticket of the REST port is no ticket here: without a client certificate the handshake fails
    rest_ctx = site.tls(None)
    _, sock = _health(site, rest_ctx, None)
    rest_session = sock.session
    sock.close()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with KmipConn(site.port, rest_ctx, session=rest_session) as c:
            c.one("Create", *aes_256_template())

    # revoked: the resumed sessions carry the certificate, which is checked again and refused
    site.server.cli("ca", "revoke", "--yes", "hypervisor:esx-1", token=site.admin)
    deadline = time.monotonic() + REVOCATION_SECONDS
    refused_in_a_row = 0
    while refused_in_a_row < 10:
        assert time.monotonic() < deadline + 10, "a resumed session of a revoked certificate is still accepted"
        try:
            with KmipConn(site.port, ctx, session=session) as c:
                refused = c.one("Create", *aes_256_template()).reason == "PermissionDenied"
        except (ssl.SSLError, ConnectionError, OSError):
            refused = True
        if not refused:
            assert time.monotonic() < deadline, "a resumed session of a revoked certificate is still accepted"
        refused_in_a_row = refused_in_a_row + 1 if refused else 0
