"""Shamir secret sharing over GF(2^8) (the AES field, polynomial x^8 + x^4 + x^3 + x + 1).

Each byte of the secret is the constant term of its own random polynomial of degree k-1;
share ``x`` holds the polynomials' values at ``x`` (1..255). Any k shares give the secret by
Lagrange interpolation at 0; fewer give no information about it.

Every share can be checked on its own against a :func:`commitment` made when the secret was
split (SHA-256 over a context, the index and the whole share value): any k shares fix every
other share (:func:`evaluate`), so the commitments of all n shares can also be made later from
one good quorum.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes

_EXP = [0] * 512
_LOG = [0] * 256


def _build_tables() -> None:
    value = 1
    for power in range(255):
        _EXP[power] = value
        _LOG[value] = power
        # multiply by the generator 3: value * 2 xor value, reduced mod 0x11b
        doubled = value << 1
        if doubled & 0x100:
            doubled ^= 0x11B
        value = doubled ^ value
    for power in range(255, 512):
        _EXP[power] = _EXP[power - 255]


_build_tables()


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(256)")
    if a == 0:
        return 0
    return _EXP[(_LOG[a] - _LOG[b]) % 255]


def split(secret: bytes | bytearray | memoryview, threshold: int, count: int) -> list[tuple[int, bytearray]]:
    """Split ``secret`` into ``count`` shares, any ``threshold`` of which recover it."""
    if not 2 <= threshold <= count <= 255:
        raise ValueError("need 2 <= threshold <= count <= 255")
    if not secret:
        raise ValueError("empty secret")
    shares = [(x, bytearray(len(secret))) for x in range(1, count + 1)]
    for i, byte in enumerate(secret):
        coefficients = [byte] + [secrets.randbelow(256) for _ in range(threshold - 1)]
        for x, y in shares:
            acc = 0
            for coefficient in reversed(coefficients):  # Horner
                acc = _mul(acc, x) ^ coefficient
            y[i] = acc
        coefficients[:] = [0] * threshold
    return shares


def combine(shares: Sequence[tuple[int, bytes | bytearray]]) -> bytearray:
    """Recover the secret from ``threshold`` (or more) distinct shares."""
    return evaluate(shares, 0)


def evaluate(shares: Sequence[tuple[int, bytes | bytearray]], at: int) -> bytearray:
    """The value at ``at`` (0 = the secret, 1..255 = that share) of the polynomials through ``shares``."""
    if not 0 <= at <= 255:
        raise ValueError("the point to evaluate at must be within 0..255")
    if len(shares) < 2:
        raise ValueError("need at least two shares")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or any(not 1 <= x <= 255 for x in xs):
        raise ValueError("share indexes must be distinct and within 1..255")
    length = len(shares[0][1])
    if any(len(y) != length for _, y in shares):
        raise ValueError("shares differ in length")
    # Lagrange basis at a: l_j = prod_{m != j} (a - x_m) / (x_j - x_m); subtraction is xor in GF(2^8)
    basis = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = _mul(num, at ^ xm)
                den = _mul(den, xj ^ xm)
        basis.append(_div(num, den))
    secret = bytearray(length)
    for (_, y), weight in zip(shares, basis, strict=True):
        for i in range(length):
            secret[i] ^= _mul(y[i], weight)
    return secret


COMMITMENT_LABEL = b"keysteward/v1/shamir-share-commitment"


def commitment(context: bytes, x: int, y: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 commitment to share ``(x, y)`` of the secret named by ``context`` (32 bytes).

    Binding by SHA-256's collision resistance; hiding because a share value is as unpredictable as the
    secret (256 bits for a 32-byte secret, even to someone holding k-1 other shares). The fields are
    length-prefixed, so no two (context, x, y) encode alike.
    """
    if not 1 <= x <= 255:
        raise ValueError("share index must be within 1..255")
    if len(context) > 255 or len(y) > 0xFFFF:
        raise ValueError("commitment context or share too long")
    h = hashes.Hash(hashes.SHA256())
    h.update(COMMITMENT_LABEL)
    h.update(struct.pack(">B", len(context)) + bytes(context))
    h.update(struct.pack(">BH", x, len(y)))
    h.update(y)
    return h.finalize()
