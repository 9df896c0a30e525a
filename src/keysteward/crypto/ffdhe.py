"""RFC 7919's ffdhe2048 group as a PKCS#3 ``DH PARAMETERS`` PEM, for QEMU's TLS server end.

QEMU's ``tls-creds-x509`` server end reads ``dh-params.pem`` from its credentials directory; without one it
has GnuTLS generate 2048-bit Diffie-Hellman parameters at ``object-add`` (0.4-1 s of CPU, measured by
bench/migration.py on the destination of every migration). Migrations run TLS 1.3 (ECDHE) and never use
them; the file only spares that generation. The group is public (RFC 7919, appendix A.1): its prime is
``2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1``, computed here rather than pasted.
"""

from __future__ import annotations

import base64
import functools
import textwrap

_BITS = 2048
_OFFSET = 560316  # RFC 7919, A.1
_GUARD = 128  # extra bits so the floor of the series' sum is exact


def ffdhe2048_prime() -> int:
    """The ffdhe2048 prime: e by its series sum(1/k!) in fixed point, floored at 2^1918."""
    scale = 1 << (_BITS - 130 + _GUARD)
    total, factorial, k = 0, 1, 0
    while term := scale // factorial:
        total += term
        k += 1
        factorial *= k
    e_floor = total >> _GUARD
    return (1 << _BITS) - (1 << (_BITS - 64)) + ((e_floor + _OFFSET) << 64) - 1


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    length = (
        bytes([size])
        if size < 0x80
        else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes((size.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + length + body


def _integer(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))  # a leading zero keeps it positive


@functools.cache
def ffdhe2048_pem() -> bytes:
    """``DHParameter ::= SEQUENCE { prime INTEGER, base INTEGER }`` (PKCS #3), PEM."""
    der = _der(0x30, _integer(ffdhe2048_prime()) + _integer(2))
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN DH PARAMETERS-----\n{body}\n-----END DH PARAMETERS-----\n".encode()
