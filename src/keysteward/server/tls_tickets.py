"""TLS session tickets that every worker of a server can open, so a client that resumes is resumed.

Each ``SSL_CTX`` makes its own random ticket keys, so with ``server.workers`` > 1 a ticket one worker
issued meant a full handshake at another (the kernel spreads connections over the workers): vCenter, which
opens a new TLS connection for almost every KMIP operation and resumes its session, was resumed on half of
them. The supervisor makes one random secret per start and hands each worker a copy through a pipe (never
the environment, never a file); each worker derives from it, with HKDF-SHA256 and the listener's name, the
80 bytes OpenSSL takes (``SSL_CTX_set_tlsext_ticket_keys``: name, HMAC key, AES key) for that listener's
context. Listeners get different keys, so a ticket from one port resumes nothing at another, as before.
Tickets die with the supervisor, as OpenSSL's own keys die with the process.

A resumed session carries the client certificate of its full handshake, and every listener still checks
that certificate at the application layer on each connection or message (revocation, pins, tenant), so
resumption changes the cost of a handshake, not who gets in.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import ssl

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keysteward.crypto import openssl_handles

log = logging.getLogger("keysteward.server")

TICKET_FD = "KEYSTEWARD_TICKET_FD"
"""The environment variable that names the worker's end of the pipe holding the secret (not the secret)."""
SECRET_BYTES = 32
_KEYS_BYTES = 80
_SET_TICKET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def pipe_for_worker(secret: bytes) -> int:
    """A pipe's read end holding ``secret``, inheritable, for one worker (the supervisor closes it after the spawn)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, secret)
    finally:
        os.close(write_end)
    os.set_inheritable(read_end, True)
    return read_end


def secret_from_supervisor() -> bytes | None:
    """The secret the supervisor piped to this worker (read once, the pipe closed), or None when started alone."""
    named = os.environ.pop(TICKET_FD, None)
    if named is None or not named.isdigit():
        return None
    fd = int(named)
    try:
        secret = os.read(fd, SECRET_BYTES + 1)
    except OSError:
        return None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return secret if len(secret) == SECRET_BYTES else None


def derived(secret: bytes, purpose: str, listener: str, size: int) -> bytes:
    """``size`` bytes for one ``purpose`` of one listener, from the supervisor's secret (HKDF-SHA256)."""
    info = f"keysteward tls {purpose} v1 {listener}".encode()
    return HKDF(hashes.SHA256(), size, salt=None, info=info).derive(secret)


def ticket_keys(secret: bytes, listener: str) -> bytes:
    """The 80 bytes of ticket keys of one listener."""
    return derived(secret, "ticket keys", listener, _KEYS_BYTES)


def share(ctx: ssl.SSLContext, secret: bytes | None, listener: str) -> bool:
    """Give ``ctx`` the listener's ticket keys; False (OpenSSL's own per-process keys stay) when there is no
    secret or the context cannot be reached safely (see :mod:`keysteward.crypto.openssl_handles`)."""
    if secret is None:
        return False
    found = openssl_handles.checked_context(ctx)
    if found is None:
        log.info("TLS tickets stay per worker on %s", listener)
        return False
    address, lib = found
    control = openssl_handles.context_control(lib)
    keys = ctypes.create_string_buffer(ticket_keys(secret, listener), _KEYS_BYTES)
    try:
        done = bool(control(address, _SET_TICKET_KEYS, _KEYS_BYTES, keys) == 1)
    finally:
        ctypes.memset(keys, 0, _KEYS_BYTES)
    if not done:
        log.warning("TLS tickets stay per worker on %s: OpenSSL refused the keys", listener)
    return done
