"""KMIP's TLS sessions, held by the server and shared by its workers, instead of session tickets.

vCenter opens a new TLS connection for almost every KMIP operation and resumes its last session. With session
tickets (:mod:`keysteward.server.tls_tickets`, which the REST and XKS ports keep) every resumption had OpenSSL
3.0 decode the whole session out of the ticket, the client certificate included, and OpenSSL 3.0 takes about
100 us to decode a certificate: the largest single cost of a new-connection operation outside the
interpreter. A session the server holds is already decoded. The KMIP context issues no tickets
(``OP_NO_TICKET``), so a TLS 1.2 client resumes by the session id and a TLS 1.3 client by a ticket that only
names a session the server holds, and OpenSSL finds it in its own cache.

One process's cache is not enough when several workers accept from one port. So the worker that begins a
session also writes it, sealed, to a :class:`SessionStore`: shared memory (a memfd the supervisor makes) of
fixed slots, the slot chosen by the session id. A worker asked for a session it does not hold opens the slot
and decodes the session once, and keeps it in its own cache from then on.

- The sealing key comes from the secret the supervisor pipes to each worker
  (:func:`keysteward.server.tls_tickets.secret_from_supervisor`), through HKDF-SHA256 with the listener's
  name. It is never written anywhere; a record is AES-256-GCM with the session id and the listener as
  associated data, so it opens only for the id and the port it was made for.
- A record torn by two workers writing one slot at once does not open: a miss, so a full handshake.
- A slot holds the last session written to it; an earlier one is still in the cache of the worker that
  began it.
- OpenSSL checks on a resumption what it always checks: the session's lifetime, the session id context, the
  protocol version and the suite. As with tickets, the listener checks the client certificate at the
  application layer on every connection (revocation, pins, tenant), so resuming changes what a handshake
  costs, not who gets in.
- TLS 1.3 sessions stay usable after a resumption, as tickets were (``OP_NO_ANTI_REPLAY``): what
  anti-replay protects is early data, which this server never accepts.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import secrets
import ssl
import struct
import weakref

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keysteward.crypto import openssl_handles
from keysteward.server import tls_tickets

log = logging.getLogger("keysteward.server")

STORE_FD = "KEYSTEWARD_TLS_SESSIONS_FD"
"""The environment variable naming the worker's descriptor of the shared store (a memfd, not a secret)."""
SLOT_BYTES = 4096
SLOTS = 8192
"""32 MiB of slots (a page never written takes no memory). Each TLS 1.3 handshake makes new sessions, so the
slots turn over with the connection rate: 16 clients at about 900 TLS 1.3 connections/s over 2,048 slots had
about one resumption in a hundred find its session overwritten (a full handshake instead)."""
CACHE_SIZE = 2 * SLOTS
"""The sessions each worker's OpenSSL cache holds (OpenSSL's default is 20,480)."""
_LENGTH = struct.Struct("<H")
_NONCE_BYTES = 12
_RECORD_MAX = SLOT_BYTES - _LENGTH.size
_SESSION_MAX = _RECORD_MAX - _NONCE_BYTES - 16
_SET_SESS_CACHE_SIZE = 42  # SSL_CTRL_SET_SESS_CACHE_SIZE
_SET_SESS_CACHE_MODE = 44  # SSL_CTRL_SET_SESS_CACHE_MODE
_SESS_CACHE_SERVER = 2
OP_NO_ANTI_REPLAY = 1 << 24  # SSL_OP_NO_ANTI_REPLAY (OpenSSL 1.1.1 and 3.x); Python's ssl does not name it

_NEW_SESSION = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_GET_SESSION = ctypes.CFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_char), ctypes.c_int, ctypes.POINTER(ctypes.c_int)
)


def new_store(slots: int = SLOTS) -> int:
    """The supervisor's side: zeroed shared memory of ``slots`` slots (its descriptor)."""
    fd = os.memfd_create("keysteward-tls-sessions")  # close-on-exec: only the workers get it (pass_fds)
    os.ftruncate(fd, slots * SLOT_BYTES)
    return fd


def store_key(secret: bytes, listener: str) -> bytes:
    """The AES-256 key that seals one listener's sessions in the store."""
    return tls_tickets.derived(secret, "session store", listener, 32)


class SessionStore:
    """Sealed sessions in shared memory, one per slot, found by session id. Pure memory and AES-GCM."""

    def __init__(self, fd: int, key: bytes, listener: str) -> None:
        size = os.fstat(fd).st_size
        if size < SLOT_BYTES or size % SLOT_BYTES:
            raise ValueError(f"a TLS session store of {size} bytes is not whole slots of {SLOT_BYTES}")
        self._map = mmap.mmap(fd, size)
        self._slots = size // SLOT_BYTES
        self._aead = AESGCM(key)
        self._listener = listener.encode()

    def _offset(self, session_id: bytes) -> int:
        # ids are random bytes the server drew, so their first bytes spread evenly over the slots
        return int.from_bytes(session_id[:8], "little") % self._slots * SLOT_BYTES

    def put(self, session_id: bytes, session: bytes) -> bool:
        """Seal ``session`` (DER) into its slot, over what was there; False when it does not fit one."""
        if not session_id or len(session) > _SESSION_MAX:
            return False
        nonce = secrets.token_bytes(_NONCE_BYTES)
        record = nonce + self._aead.encrypt(nonce, session, self._listener + b"\0" + session_id)
        at = self._offset(session_id)
        self._map[at : at + _LENGTH.size + len(record)] = _LENGTH.pack(len(record)) + record
        return True

    def get(self, session_id: bytes) -> bytes | None:
        """The session of ``session_id`` (DER), or None: another session's slot, empty, torn or forged."""
        if not session_id:
            return None
        at = self._offset(session_id)
        (length,) = _LENGTH.unpack_from(self._map, at)
        if not _NONCE_BYTES < length <= _RECORD_MAX:
            return None
        record = self._map[at + _LENGTH.size : at + _LENGTH.size + length]
        try:
            return self._aead.decrypt(record[:_NONCE_BYTES], record[_NONCE_BYTES:], self._listener + b"\0" + session_id)
        except InvalidTag:
            return None


class _Hooks:
    """OpenSSL's new-session and get-session callbacks of one context, kept alive as long as it is."""

    def __init__(self, lib: ctypes.CDLL, store: SessionStore) -> None:
        self.store = store
        self._i2d = lib.i2d_SSL_SESSION
        self._i2d.restype, self._i2d.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]
        self._d2i = lib.d2i_SSL_SESSION
        self._d2i.restype = ctypes.c_void_p
        self._d2i.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
        self._id = lib.SSL_SESSION_get_id
        self._id.restype = ctypes.POINTER(ctypes.c_char)
        self._id.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
        self.new = _NEW_SESSION(self._on_new)
        self.get = _GET_SESSION(self._on_get)

    def _on_new(self, _ssl: int, session: int) -> int:
        """A session this worker began: into the store for the others. 0: OpenSSL keeps its reference."""
        try:
            length = ctypes.c_uint()
            session_id = ctypes.string_at(self._id(session, ctypes.byref(length)), length.value)
            size = self._i2d(session, None)
            if 0 < size <= _SESSION_MAX:
                der = ctypes.create_string_buffer(size)
                out = ctypes.c_char_p(ctypes.addressof(der))
                if self._i2d(session, ctypes.byref(out)) == size:
                    self.store.put(session_id, der.raw)
                ctypes.memset(der, 0, size)
        except Exception as exc:  # noqa: BLE001 - never into OpenSSL's handshake; it still resumes here
            log.warning("a TLS session was not shared with the other workers: %s", type(exc).__name__)
        return 0

    def _on_get(
        self, _ssl: int, data: ctypes.Array[ctypes.c_char], length: int, copy: ctypes.Array[ctypes.c_int]
    ) -> int | None:
        """A session this worker's cache does not hold: from the store, decoded, or None (a full handshake)."""
        try:
            der = self.store.get(ctypes.string_at(data, length))
            if der is None:
                return None
            cursor = ctypes.c_char_p(der)
            session = self._d2i(None, ctypes.byref(cursor), len(der))
            if session:
                copy[0] = 0  # OpenSSL takes the one reference d2i made
            return session or None
        except Exception as exc:  # noqa: BLE001 - never into OpenSSL's handshake: a full one follows
            log.warning("a shared TLS session could not be read: %s", type(exc).__name__)
            return None


_held: weakref.WeakKeyDictionary[ssl.SSLContext, _Hooks] = weakref.WeakKeyDictionary()
"""Each context's callbacks, alive as long as it is (its connections hold it)."""


def hold_sessions(ctx: ssl.SSLContext, store: SessionStore | None) -> bool:
    """Make ``ctx`` keep its sessions instead of issuing tickets, and share them through ``store`` when given.
    False when ``ctx`` cannot be reached safely: then it keeps issuing tickets."""
    found = openssl_handles.checked_context(ctx)
    if found is None:
        return False
    address, lib = found
    ctx.options |= ssl.OP_NO_TICKET | OP_NO_ANTI_REPLAY
    control = openssl_handles.context_control(lib)
    control(address, _SET_SESS_CACHE_MODE, _SESS_CACHE_SERVER, None)
    control(address, _SET_SESS_CACHE_SIZE, CACHE_SIZE, None)
    if store is None:
        return True
    hooks = _Hooks(lib, store)
    set_new = lib.SSL_CTX_sess_set_new_cb
    set_new.restype, set_new.argtypes = None, [ctypes.c_void_p, _NEW_SESSION]
    set_get = lib.SSL_CTX_sess_set_get_cb
    set_get.restype, set_get.argtypes = None, [ctypes.c_void_p, _GET_SESSION]
    _held[ctx] = hooks
    set_new(address, hooks.new)
    set_get(address, hooks.get)
    return True


def store_from_supervisor(secret: bytes | None, listener: str) -> SessionStore | None:
    """This worker's view of the store its supervisor made (the descriptor named by :data:`STORE_FD`, closed
    once mapped), or None when started alone or without the secret to seal with."""
    named = os.environ.pop(STORE_FD, None)
    if named is None or not named.isdigit():
        return None
    fd = int(named)
    try:
        return None if secret is None else SessionStore(fd, store_key(secret, listener), listener)
    except (OSError, ValueError) as exc:
        log.warning("TLS sessions stay per worker on %s: %s", listener, exc)
        return None
    finally:
        os.close(fd)
