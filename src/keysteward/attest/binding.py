"""The binding of evidence to one release request: ``sha256(nonce || public_key)``.

Written as 64 lowercase hex digits into the evidence (an identity document's ``nonce``), it makes the
evidence single-use (the nonce) and useless for any other one-time HPKE key (the public key).
"""

from __future__ import annotations

import hashlib
import json

BINDING_SIZE = 32


def binding(nonce: bytes, public_key: bytes) -> bytes:
    """The 32-byte binding of a challenge nonce (raw bytes) and a one-time public key (raw bytes)."""
    return hashlib.sha256(nonce + public_key).digest()


def host_binding(nonce: bytes, public_key: bytes, hardware: bytes) -> bytes:
    """The binding of a VM request from a host: the release binding extended with the host's hardware facts
    (their canonical JSON), so the TPM quote over it also vouches for what the host says its hardware offers."""
    return hashlib.sha256(b"keysteward-host/1\x00" + nonce + public_key + hashlib.sha256(hardware).digest()).digest()


def canonical_hardware(facts: dict[str, bool]) -> bytes:
    """The bytes :func:`host_binding` covers: the facts as sorted, compact JSON."""
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()
