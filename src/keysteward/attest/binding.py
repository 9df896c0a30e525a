"""The binding of evidence to one release request: ``sha256(nonce || public_key)``.

Written as 64 lowercase hex digits into the evidence (an identity document's ``nonce``), it makes the
evidence single-use (the nonce) and useless for any other one-time HPKE key (the public key).
"""

from __future__ import annotations

import hashlib

BINDING_SIZE = 32


def binding(nonce: bytes, public_key: bytes) -> bytes:
    """The 32-byte binding of a challenge nonce (raw bytes) and a one-time public key (raw bytes)."""
    return hashlib.sha256(nonce + public_key).digest()
