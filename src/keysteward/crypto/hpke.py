"""HPKE (RFC 9180, base mode) sealing of released keys to a one-time key of the requester.

Two suites, named as on the wire (docs/release-protocol.md):

* ``x25519``: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (the default);
* ``mlkem768-x25519``: the hybrid post-quantum KEM ML-KEM-768 + X25519, HKDF-SHA256, AES-256-GCM.
  Its public key travels as the ML-KEM-768 encapsulation key (1184 bytes) followed by the X25519
  public key (32 bytes).

pyca/cryptography does the cryptography; this module names the suites, encodes public keys and maps
failures to :class:`HpkeError`. A :class:`OneTimeKey` lives for one release and is dropped after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from keysteward.errors import BadRequest

X25519: Final = "x25519"
MLKEM768_X25519: Final = "mlkem768-x25519"
SUITES: Final = (X25519, MLKEM768_X25519)
_MLKEM768_PUBLIC = 1184
_X25519_PUBLIC = 32
PUBLIC_KEY_SIZES: Final = {X25519: _X25519_PUBLIC, MLKEM768_X25519: _MLKEM768_PUBLIC + _X25519_PUBLIC}

_SUITE_OBJECTS = {
    X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    MLKEM768_X25519: hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}

PublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
PrivateKey = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey


class HpkeError(BadRequest):
    """A suite name or public key that cannot be used, or a sealed value that does not open."""

    code = "hpke_invalid"


def _suite(name: str) -> hpke.Suite:
    try:
        return _SUITE_OBJECTS[name]
    except KeyError:
        raise HpkeError(f"unknown HPKE suite {name[:40]!r}; use one of {', '.join(SUITES)}") from None


def load_public_key(suite: str, raw: bytes) -> PublicKey:
    """The public key of ``suite`` from its wire bytes; wrong sizes and invalid points are refused."""
    _suite(suite)
    expected = PUBLIC_KEY_SIZES[suite]
    if len(raw) != expected:
        raise HpkeError(f"a {suite} public key has {expected} bytes, not {len(raw)}")
    try:
        if suite == X25519:
            return x25519.X25519PublicKey.from_public_bytes(raw)
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC]),
            x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC:]),
        )
    except ValueError as exc:
        raise HpkeError(f"the {suite} public key is not a valid key") from exc


def seal(suite: str, public_key: bytes, plaintext: bytes | bytearray, info: bytes) -> bytes:
    """``enc || ciphertext`` of ``plaintext`` for the holder of ``public_key``'s private key."""
    return _suite(suite).encrypt(bytes(plaintext), load_public_key(suite, public_key), info=info)


@dataclass(frozen=True, repr=False)
class OneTimeKey:
    """A fresh HPKE key pair for one release: send :attr:`public_bytes`, open the answer, drop it."""

    suite: str
    private_key: PrivateKey
    public_bytes: bytes

    @classmethod
    def generate(cls, suite: str = X25519) -> OneTimeKey:
        _suite(suite)
        if suite == X25519:
            x = x25519.X25519PrivateKey.generate()
            return cls(suite, x, x.public_key().public_bytes_raw())
        m, x = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        public = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
        return cls(suite, hpke.MLKEM768X25519PrivateKey(m, x), public)

    def open(self, sealed: bytes, info: bytes) -> bytearray:
        """The plaintext in a wiped-on-demand bytearray; a sealed value that was altered raises."""
        try:
            return bytearray(_suite(self.suite).decrypt(sealed, self.private_key, info=info))
        except (InvalidTag, ValueError) as exc:
            raise HpkeError("the sealed key does not open with this one-time key (altered or for another)") from exc

    def __repr__(self) -> str:
        return f"OneTimeKey({self.suite})"
