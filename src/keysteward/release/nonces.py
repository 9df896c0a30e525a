"""Release nonces: stateless to issue, single-use to spend.

A nonce is 41 bytes: version ``0x01``, its expiry (u64 big-endian, milliseconds since the epoch),
16 random bytes, and the first 16 bytes of HMAC-SHA256 over the rest, under a key derived from the root
key (so every server of a cluster accepts every other's nonces, and issuing one writes nothing).
Spending one records its digest in ``used_nonces`` inside the release's transaction; a second
spend finds the row and is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import threading
import time
from datetime import UTC, datetime

from sqlalchemy import Connection, DateTime, delete

from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import Denied
from keysteward.keys.root import RootOfTrust
from keysteward.store.driver import DriverStatement
from keysteward.store.models import UsedNonce

VERSION = 1
NONCE_SIZE = 41
_HEAD = struct.Struct(">BQ")
_TAG = 16
_LABEL = b"release-nonce/v1"


_SPEND = DriverStatement(
    "INSERT INTO used_nonces (digest, expires_at) VALUES (:digest, :expires_at)"
    " ON CONFLICT DO NOTHING RETURNING digest",
    {"expires_at": DateTime(timezone=True)},
)
"""Run on the driver's connection (:mod:`keysteward.store.driver`): every release spends one."""


def digest_of(raw: bytes) -> str:
    """What ``used_nonces`` keeps of a spent nonce."""
    return hashlib.sha256(raw).hexdigest()


def replayed() -> Denied:
    return Denied("this nonce was already used; evidence is single-use", code="nonce_replayed")


def decode(text: str) -> bytes:
    """The raw nonce from its base64url text; anything that is not one is ``nonce_invalid``."""
    if not isinstance(text, str) or len(text) > 64:
        raise Denied("the nonce is not one this key manager issued", code="nonce_invalid")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise Denied("the nonce is not base64url", code="nonce_invalid") from None
    if len(raw) != NONCE_SIZE or raw[0] != VERSION:
        raise Denied("the nonce is not one this key manager issued", code="nonce_invalid")
    return raw


def encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class Nonces:
    def __init__(self, root: RootOfTrust, ttl_seconds: float) -> None:
        self.root = root
        self.ttl = ttl_seconds
        self._key: bytearray | None = None
        self._lock = threading.Lock()
        root.on_seal(self._forget)

    def _forget(self) -> None:
        with self._lock:
            if self._key is not None:
                wipe_bytearray(self._key)
            self._key = None

    def _mac_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self.root.derive(_LABEL)
            return bytes(self._key)

    def issue(self, now: float | None = None) -> tuple[str, datetime]:
        expires_ms = int(((time.time() if now is None else now) + self.ttl) * 1000)
        body = _HEAD.pack(VERSION, expires_ms) + os.urandom(16)
        tag = hmac.new(self._mac_key(), body, hashlib.sha256).digest()[:_TAG]
        return encode(body + tag), datetime.fromtimestamp(expires_ms / 1000, UTC)

    def check(self, raw: bytes, now: float | None = None) -> datetime:
        """Verify the tag and the expiry (not single use: :meth:`spend` does that); returns the expiry."""
        body, tag = raw[:-_TAG], raw[-_TAG:]
        if not hmac.compare_digest(hmac.new(self._mac_key(), body, hashlib.sha256).digest()[:_TAG], tag):
            raise Denied("the nonce is not one this key manager issued", code="nonce_invalid")
        _, expires_ms = _HEAD.unpack_from(body)
        if (time.time() if now is None else now) * 1000 >= expires_ms:
            raise Denied("the nonce has expired; ask for a new challenge", code="nonce_expired")
        return datetime.fromtimestamp(expires_ms / 1000, UTC)

    @staticmethod
    def spend(conn: Connection, raw: bytes, expires_at: datetime) -> None:
        """Record the nonce as used inside the caller's transaction; a second spend is ``nonce_replayed``."""
        if not _SPEND.rows(conn, {"digest": digest_of(raw), "expires_at": expires_at}):  # spent before
            raise replayed()

    @staticmethod
    def sweep(conn: Connection, now: datetime) -> int:
        """Forget spent nonces that have expired (they can no longer pass :meth:`check`)."""
        return conn.execute(delete(UsedNonce).where(UsedNonce.expires_at < now)).rowcount or 0
