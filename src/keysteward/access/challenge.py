"""A release's challenge: a fresh one-time nonce, with the protocol and the HPKE suites its key may use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from keysteward.crypto import hpke
from keysteward.formats.release_wire import PROTOCOL
from keysteward.release.nonces import Nonces


@dataclass(frozen=True)
class Challenge:
    protocol: str
    nonce: str
    expires_at: datetime
    suites: tuple[str, ...]


def challenge(nonces: Nonces) -> Challenge:
    """A fresh nonce for a release, with the protocol and the HPKE suites a one-time key may use."""
    nonce, expires_at = nonces.issue()
    return Challenge(PROTOCOL, nonce, expires_at, tuple(hpke.SUITES))
