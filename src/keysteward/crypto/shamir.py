"""Shamir secret sharing over GF(2^8) (the AES field, polynomial x^8 + x^4 + x^3 + x + 1).

Each byte of the secret is the constant term of its own random polynomial of degree k-1;
share ``x`` holds the polynomials' values at ``x`` (1..255). Any k shares give the secret by
Lagrange interpolation at 0; fewer give no information about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

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
    if len(shares) < 2:
        raise ValueError("need at least two shares")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or any(not 1 <= x <= 255 for x in xs):
        raise ValueError("share indexes must be distinct and within 1..255")
    length = len(shares[0][1])
    if any(len(y) != length for _, y in shares):
        raise ValueError("shares differ in length")
    # Lagrange basis at 0: l_j = prod_{m != j} x_m / (x_m - x_j); subtraction is xor in GF(2^8)
    basis = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = _mul(num, xm)
                den = _mul(den, xm ^ xj)
        basis.append(_div(num, den))
    secret = bytearray(length)
    for (_, y), weight in zip(shares, basis, strict=True):
        for i in range(length):
            secret[i] ^= _mul(y[i], weight)
    return secret
