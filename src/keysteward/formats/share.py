"""Text form of an unseal share: ``kss1-<cluster>-<index>-<value>-<check>``.

* ``cluster``: 16 hex digits naming the server cluster the share belongs to, so a share of
  another server is refused before it is used;
* ``index``: the share's x coordinate, 1..255;
* ``value``: the share bytes in lowercase hex;
* ``check``: the first 4 bytes of SHA-256 over the text before it, in hex, to catch typos.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from keysteward.errors import InvalidShare

PREFIX = "kss1"
MAX_TEXT = 1024
_PATTERN = re.compile(r"^kss1-([0-9a-f]{16})-([0-9]{1,3})-([0-9a-f]{2,512})-([0-9a-f]{8})$")


@dataclass(frozen=True, repr=False)
class Share:
    cluster: bytes
    index: int
    value: bytes

    def __repr__(self) -> str:
        return f"Share(cluster={self.cluster.hex()}, index={self.index})"


def _check(body: str) -> str:
    return hashlib.sha256(body.encode()).digest()[:4].hex()


def encode(share: Share) -> str:
    if len(share.cluster) != 8 or not 1 <= share.index <= 255:
        raise ValueError("share cluster must be 8 bytes and index 1..255")
    body = f"{PREFIX}-{share.cluster.hex()}-{share.index}-{share.value.hex()}"
    return f"{body}-{_check(body)}"


def decode(text: str) -> Share:
    if len(text) > MAX_TEXT:
        raise InvalidShare("share text is too long")
    text = text.strip()
    if not text.startswith(PREFIX + "-"):
        raise InvalidShare("not a keysteward unseal share (expected it to start with 'kss1-')")
    match = _PATTERN.match(text)
    if match is None:
        raise InvalidShare("malformed unseal share")
    cluster, index, value, check = match.groups()
    body = text[: -(len(check) + 1)]
    if not hmac.compare_digest(_check(body), check):
        raise InvalidShare("unseal share checksum does not match (typo?)")
    if len(value) % 2:
        raise InvalidShare("malformed unseal share value")
    idx = int(index)
    if not 1 <= idx <= 255:
        raise InvalidShare("unseal share index out of range")
    return Share(bytes.fromhex(cluster), idx, bytes.fromhex(value))
