"""KMIP's TLS sessions held by the server (keysteward/server/tls_sessions.py), with real OpenSSL handshakes.

Two server contexts stand for two workers: each has its own OpenSSL session cache and its own mapping of one
shared store, and each serves real TLS connections on its own port. A client that began its session at one
must resume at the other, with TLS 1.2 (session ids) and TLS 1.3 (tickets that only name a held session),
and a worker decodes a session it did not begin once, not on every connection. Without the store, or with
its record damaged, the handshake is a full one and still succeeds.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keysteward.server import tls_sessions as ts
from tests.support.selfsigned import self_signed

pytestmark = pytest.mark.integration
SECRET = b"k" * 32


@dataclass
class Worker:
    ctx: ssl.SSLContext
    port: int
    store: ts.SessionStore | None


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = self_signed(tmp_path, "ca", "sessions test CA", is_ca=True)
    server = self_signed(tmp_path, "server", "127.0.0.1", issuer=ca)
    client = self_signed(tmp_path, "client", "esx-1", issuer=ca)
    return {"ca": ca[0], "server": server[0], "server_key": server[1], "client": client[0], "client_key": client[1]}


def _serve(listening: socket.socket, ctx: ssl.SSLContext) -> None:
    while True:
        try:
            raw, _ = listening.accept()
        except OSError:
            return
        try:
            with ctx.wrap_socket(raw, server_side=True) as tls:
                tls.sendall(tls.recv(1))
                tls.unwrap()  # a clean close keeps the session in OpenSSL's cache
        except (OSError, ssl.SSLError):
            raw.close()


@pytest.fixture
def workers(pki: dict[str, Path], request: pytest.FixtureRequest) -> Iterator[list[Worker]]:
    """Two workers, sharing one store unless parametrized (indirectly) with False."""
    shared = getattr(request, "param", True)
    fd = ts.new_store(16)
    made, sockets = [], []
    for _ in range(2):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki["server"], pki["server_key"])
        ctx.load_verify_locations(pki["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        store = ts.SessionStore(fd, ts.store_key(SECRET, "kmip"), "kmip") if shared else None
        assert ts.hold_sessions(ctx, store)
        listening = socket.create_server(("127.0.0.1", 0))
        sockets.append(listening)
        threading.Thread(target=_serve, args=(listening, ctx), daemon=True).start()
        made.append(Worker(ctx, listening.getsockname()[1], store))
    yield made
    for listening in sockets:
        listening.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept (a close alone does not)
        listening.close()
    os.close(fd)


def _client(pki: dict[str, Path], version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(pki["client"], pki["client_key"])
    ctx.maximum_version = version
    return ctx


def _connect(ctx: ssl.SSLContext, worker: Worker, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession]:
    """One connection (resuming ``session`` if given): whether it resumed, and the session to resume next."""
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", worker.port), timeout=10), session=session) as tls:
        tls.sendall(b"x")
        assert tls.recv(1) == b"x"
        resumed, latest = tls.session_reused, tls.session
        tls.unwrap()
    assert latest is not None
    return bool(resumed), latest


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_begun_at_one_worker_resumes_at_the_other(
    pki: dict[str, Path], workers: list[Worker], version: ssl.TLSVersion
) -> None:
    ctx = _client(pki, version)
    resumed, session = _connect(ctx, workers[0], None)
    assert not resumed
    outcomes = []
    for i in range(1, 21):
        resumed, session = _connect(ctx, workers[i % 2], session)
        outcomes.append(resumed)
    assert all(outcomes), outcomes
    if version == ssl.TLSVersion.TLSv1_2:
        assert not session.has_ticket  # held by the server: a session id, no ticket
        # the other worker decoded the session once, then found it in its own cache
        assert workers[1].ctx.session_stats()["misses"] == 1
        assert workers[0].ctx.session_stats()["misses"] == 0


@pytest.mark.parametrize("workers", [False], indirect=True)
def test_without_the_store_a_worker_cannot_resume_the_others_session(
    pki: dict[str, Path], workers: list[Worker]
) -> None:
    ctx = _client(pki, ssl.TLSVersion.TLSv1_2)
    _, session = _connect(ctx, workers[0], None)
    assert _connect(ctx, workers[0], session)[0]  # its own cache
    assert not _connect(ctx, workers[1], session)[0]  # a full handshake, which still succeeds


def test_a_damaged_record_means_a_full_handshake(pki: dict[str, Path], workers: list[Worker]) -> None:
    ctx = _client(pki, ssl.TLSVersion.TLSv1_2)
    _, session = _connect(ctx, workers[0], None)
    store = workers[1].store
    assert store is not None
    at = int.from_bytes(session.id[:8], "little") % 16 * ts.SLOT_BYTES
    store._map[at + 40] ^= 0x55  # one byte of the sealed record, flipped
    resumed, _ = _connect(ctx, workers[1], session)
    assert not resumed
    assert _connect(ctx, workers[0], session)[0]  # the worker that began it still holds it
