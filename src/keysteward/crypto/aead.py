"""AES-256-GCM envelopes: ``nonce (12) || ciphertext || tag (16)`` with caller-supplied AAD.

Every wrap in keysteward (DEK under KEK, KEK under root, root under the unseal key) goes
through here, so the AAD rules live with the callers and the primitive lives once.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keysteward.errors import KeystewardError, Unavailable

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE

Buffer = bytes | bytearray | memoryview


class AuthenticationFailed(KeystewardError):
    """The envelope does not open under this key and AAD (wrong key, wrong AAD or tampered bytes)."""

    code = "authentication_failed"
    status = 400
    title = "Authentication failed"


class AeadKey:
    """An AES-256-GCM key ready for many seal/open calls."""

    __slots__ = ("_aead",)

    def __init__(self, key: Buffer) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._aead: AESGCM | None = AESGCM(bytes(key))

    def _get(self) -> AESGCM:
        if self._aead is None:
            raise Unavailable("the key was dropped (sealed or destroyed) during the operation", code="key_dropped")
        return self._aead

    def seal(self, plaintext: Buffer, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._get().encrypt(nonce, bytes(plaintext), aad)

    def open(self, blob: Buffer, aad: bytes) -> bytearray:
        if len(blob) < OVERHEAD:
            raise AuthenticationFailed("envelope too short")
        data = bytes(blob)
        try:
            return bytearray(self._get().decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], aad))
        except InvalidTag as exc:
            raise AuthenticationFailed("envelope does not authenticate under this key") from exc

    def drop(self) -> None:
        self._aead = None

    def __repr__(self) -> str:
        return "<AeadKey>"


def seal(key: Buffer, plaintext: Buffer, aad: bytes) -> bytes:
    return AeadKey(key).seal(plaintext, aad)


def open_(key: Buffer, blob: Buffer, aad: bytes) -> bytearray:
    return AeadKey(key).open(blob, aad)


def random_key(size: int = KEY_SIZE) -> bytearray:
    return bytearray(os.urandom(size))
