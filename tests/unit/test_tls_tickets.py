"""The ticket secret's hand-over from supervisor to worker, and the keys derived from it."""

from __future__ import annotations

import os
import ssl

import pytest

from keysteward.server import tls_tickets


def test_each_listener_gets_its_own_keys_from_one_secret() -> None:
    secret = tls_tickets.new_secret()
    kmip, rest = tls_tickets.ticket_keys(secret, "kmip"), tls_tickets.ticket_keys(secret, "rest")
    assert len(kmip) == len(rest) == 80 and kmip != rest
    assert tls_tickets.ticket_keys(secret, "kmip") == kmip  # every worker derives the same
    assert tls_tickets.ticket_keys(tls_tickets.new_secret(), "kmip") != kmip


def test_a_worker_reads_its_secret_once_from_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tls_tickets.new_secret()
    fd = tls_tickets.pipe_for_worker(secret)
    monkeypatch.setenv(tls_tickets.TICKET_FD, str(fd))
    assert tls_tickets.secret_from_supervisor() == secret
    assert tls_tickets.TICKET_FD not in os.environ  # nothing left for a child process to inherit
    with pytest.raises(OSError):
        os.fstat(fd)  # the pipe is closed
    assert tls_tickets.secret_from_supervisor() is None  # started alone: OpenSSL's own keys


@pytest.mark.parametrize("content", [b"", b"short", b"x" * 33])
def test_a_secret_of_the_wrong_size_is_not_used(monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, content)
    os.close(write_end)
    monkeypatch.setenv(tls_tickets.TICKET_FD, str(read_end))
    assert tls_tickets.secret_from_supervisor() is None
    monkeypatch.setenv(tls_tickets.TICKET_FD, "not-a-number")
    assert tls_tickets.secret_from_supervisor() is None


def test_the_keys_reach_the_context() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert tls_tickets.share(ctx, tls_tickets.new_secret(), "kmip")
    assert not tls_tickets.share(ctx, None, "kmip")
