"""Small types shared by the LUKS codecs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from keysteward.formats.luks.errors import LuksFormatError

RandomSource = Callable[[int], bytes]
"""``rng(n) -> n random bytes``; ``os.urandom`` unless a test injects another."""


@dataclass(frozen=True)
class Write:
    """Bytes to write at a byte offset of the device; the codecs never write themselves."""

    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    def __repr__(self) -> str:  # never print the bytes: some are key material (encrypted, but still)
        return f"Write(offset={self.offset}, length={len(self.data)})"


def cstring(field: bytes, what: str) -> str:
    """A NUL-terminated fixed-size ASCII/UTF-8 field; raises on invalid text."""
    text = field.split(b"\x00", 1)[0]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LuksFormatError(f"LUKS header field {what} is not valid UTF-8") from exc


def encode_cstring(text: str, size: int, what: str) -> bytes:
    """``text`` NUL-padded to ``size`` bytes, with room for at least one NUL."""
    raw = text.encode("utf-8")
    if len(raw) >= size or b"\x00" in raw:
        raise LuksFormatError(f"LUKS header field {what} must be at most {size - 1} bytes without NUL")
    return raw + bytes(size - len(raw))
