"""The key release wire format ``KSR1`` (docs/release-protocol.md), once for the server, agents and benches.

A released (or newly registered) volume secret travels HPKE-sealed; the sealed plaintext is

    "KSR1" || u8 len || secret (len bytes, 1-255) || lease token (32 bytes)

and the HPKE ``info`` binds it to the protocol, tenant, volume and lease (``create`` for a registration):

    "keysteward-release/1" 0x00 tenant 0x00 volume_id 0x00 lease_id

Pure: bytes in, bytes (or offsets) out. The caller owns every buffer and wipes what it holds.
"""

from __future__ import annotations

from typing import Final

from keysteward.errors import BadRequest

PROTOCOL: Final = "keysteward-release/1"
MAGIC: Final = b"KSR1"
TOKEN_SIZE: Final = 32
CREATE_LEASE_ID: Final = "create"
"""The ``lease_id`` in the HPKE info of a registration's sealed secret (it has no lease)."""
_HEADER: Final = len(MAGIC) + 1


class ReleaseWireError(BadRequest):
    """A sealed plaintext that is not a KSR1 release (wrong magic, length or size byte)."""

    code = "release_wire_invalid"


def seal_info(tenant: str, volume_id: str, lease_id: str) -> bytes:
    """HPKE ``info``: binds the sealed key to the protocol, tenant, volume and lease."""
    return b"\x00".join(part.encode() for part in (PROTOCOL, tenant, volume_id, lease_id))


def pack_secret(secret: bytes | bytearray | memoryview, token: bytes | bytearray) -> bytearray:
    """The plaintext inside ``sealed``, in a bytearray the caller wipes."""
    if not 0 < len(secret) < 256 or len(token) != TOKEN_SIZE:
        raise ValueError("secret must be 1-255 bytes and the token 32")
    out = bytearray(MAGIC)
    out.append(len(secret))
    out += secret
    out += token
    return out


def split_secret(plaintext: bytes | bytearray | memoryview) -> tuple[slice, slice]:
    """Where the secret and the lease token lie in a KSR1 plaintext (slices, so no copy is made here)."""
    if len(plaintext) < _HEADER + 1 or bytes(plaintext[: len(MAGIC)]) != MAGIC:
        raise ReleaseWireError("the sealed value is not a KSR1 release")
    size = plaintext[len(MAGIC)]
    if size == 0 or len(plaintext) != _HEADER + size + TOKEN_SIZE:
        raise ReleaseWireError("the KSR1 release has the wrong length")
    return slice(_HEADER, _HEADER + size), slice(_HEADER + size, _HEADER + size + TOKEN_SIZE)
