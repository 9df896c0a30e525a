"""Registered cloud providers: the certificates whose keys sign instance identity evidence."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from keysteward.errors import BadRequest

IdentityKind = Literal["aws-iid", "gcp-jwt"]
KINDS: Final[tuple[IdentityKind, ...]] = ("aws-iid", "gcp-jwt")
MAX_PEM_BYTES: Final = 64 * 1024
MIN_RSA_BITS: Final = 2048
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="bad_provider")


@dataclass(frozen=True)
class ProviderTrust:
    """One provider a tenant trusts: its name (part of instance identities), kind and signing certificates.

    ``audience`` is the audience its identity tokens must carry (gcp-jwt only).
    """

    name: str
    kind: IdentityKind
    certificates: Sequence[x509.Certificate]
    audience: str | None = None

    @classmethod
    def from_pem(cls, name: str, kind: str, pem: str, audience: str | None) -> ProviderTrust:
        """Parse and check a provider registration; raises ``BadRequest(code="bad_provider")``."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _bad("provider name must be 1-64 characters of letters, digits, '.', '_' or '-'")
        if kind not in KINDS:
            raise _bad(f"unknown provider kind (expected one of {', '.join(KINDS)})")
        if not isinstance(pem, str) or len(pem.encode("utf-8", "replace")) > MAX_PEM_BYTES:
            raise _bad(f"provider certificates must be PEM text of at most {MAX_PEM_BYTES} bytes")
        if audience == "":
            audience = None
        if kind == "gcp-jwt" and (not isinstance(audience, str) or len(audience) > 1024):
            raise _bad("a gcp-jwt provider needs the audience its identity tokens carry (at most 1024 characters)")
        if kind != "gcp-jwt" and audience is not None:
            raise _bad("only gcp-jwt providers take an audience")
        try:
            certificates = x509.load_pem_x509_certificates(pem.encode("utf-8"))
        except ValueError as exc:
            raise _bad(f"provider {name!r}: the certificates do not parse as PEM X.509") from exc
        if not certificates:
            raise _bad(f"provider {name!r}: no certificate given")
        for cert in certificates:
            key = cert.public_key()
            if not isinstance(key, rsa.RSAPublicKey):
                raise _bad(f"provider {name!r}: certificate {describe_certificate(cert)} does not hold an RSA key")
            if key.key_size < MIN_RSA_BITS:
                raise _bad(
                    f"provider {name!r}: certificate {describe_certificate(cert)} has a {key.key_size}-bit RSA key "
                    f"(at least {MIN_RSA_BITS} needed)"
                )
        return cls(name=name, kind=kind, certificates=tuple(certificates), audience=audience)


def describe_certificate(cert: x509.Certificate) -> str:
    """Subject and serial: enough for an operator to find the certificate."""
    return f"'{cert.subject.rfc4514_string()}' (serial {cert.serial_number:x})"


def certificate_valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
