"""Typed, frozen LUKS2 metadata (the JSON area), and its encoding back to JSON.

Each object keeps the JSON it was parsed from in ``raw`` (not compared): encoding sets the typed
fields into that JSON in place, so unknown fields and the key order that cryptsetup wrote survive,
and an unchanged header re-encodes byte for byte. Objects built from scratch encode in cryptsetup's
key order. Numbered sections are read-only mappings from id to object, in on-disk order.

64-bit values (offsets, sizes, ``json_size``, ``keyslots_size``, ``iv_tweak``) are JSON strings on
disk and ``int`` here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from keysteward.formats.luks._json import JsonObject, b64, merge
from keysteward.formats.luks.afsplit import STRIPES
from keysteward.formats.luks.kdf import Argon2Params, KdfParams, Pbkdf2Params

BINARY_HEADER_SIZE = 4096
IV_SECTOR = 512
"""LUKS2 (dm-crypt without ``iv_large_sectors``) counts IVs in 512-byte units, whatever the sector size."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})
T = TypeVar("T")


def frozen_map(items: Mapping[int, T] | None = None) -> Mapping[int, T]:
    """A read-only copy of ``items`` (in their order)."""
    return MappingProxyType(dict(items or {}))


def _empty() -> Mapping[str, Any]:
    return _EMPTY


def _raw() -> Any:
    return field(default_factory=_empty, compare=False, repr=False)


@dataclass(frozen=True)
class KeyslotArea:
    """Where a keyslot's encrypted split key lives (type ``raw``), and how it is encrypted."""

    offset: int
    size: int
    encryption: str = "aes-xts-plain64"
    key_size: int = 64
    raw: Mapping[str, Any] = _raw()

    def to_json(self) -> JsonObject:
        known = {
            "type": "raw",
            "offset": str(self.offset),
            "size": str(self.size),
            "encryption": self.encryption,
            "key_size": self.key_size,
        }
        return merge(self.raw, known)


@dataclass(frozen=True)
class AntiForensic:
    """The AF splitter of a keyslot (type ``luks1``)."""

    hash: str = "sha256"
    stripes: int = STRIPES
    raw: Mapping[str, Any] = _raw()

    def to_json(self) -> JsonObject:
        return merge(self.raw, {"type": "luks1", "stripes": self.stripes, "hash": self.hash})


def kdf_to_json(kdf: KdfParams) -> JsonObject:
    if isinstance(kdf, Pbkdf2Params):
        return {"type": "pbkdf2", "hash": kdf.hash, "iterations": kdf.iterations, "salt": b64(kdf.salt)}
    return {"type": kdf.kind, "time": kdf.time, "memory": kdf.memory_kib, "cpus": kdf.cpus, "salt": b64(kdf.salt)}


@dataclass(frozen=True)
class Luks2Keyslot:
    """A ``luks2`` keyslot: ``key_size`` is the volume key's size in bytes."""

    key_size: int
    area: KeyslotArea
    kdf: KdfParams
    af: AntiForensic = field(default_factory=AntiForensic)
    priority: int | None = None
    """0 ignore (only used when asked for by number), 1 normal, 2 prefer; None = not stored (normal)."""
    raw: Mapping[str, Any] = _raw()

    def to_json(self) -> JsonObject:
        known: JsonObject = {
            "type": "luks2",
            "key_size": self.key_size,
            "af": self.af.to_json(),
            "area": self.area.to_json(),
            "kdf": kdf_to_json(self.kdf),
        }
        if self.priority is not None:
            known["priority"] = self.priority
        return merge(self.raw, known, drop=("priority",))

    @property
    def uses_argon2(self) -> bool:
        return isinstance(self.kdf, Argon2Params)


@dataclass(frozen=True)
class Luks2Digest:
    """A ``pbkdf2`` digest of the volume key: it binds keyslots to the segments they unlock."""

    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    hash: str
    iterations: int
    salt: bytes
    digest: bytes
    raw: Mapping[str, Any] = _raw()

    def to_json(self) -> JsonObject:
        known = {
            "type": "pbkdf2",
            "keyslots": [str(k) for k in self.keyslots],
            "segments": [str(s) for s in self.segments],
            "hash": self.hash,
            "iterations": self.iterations,
            "salt": b64(self.salt),
            "digest": b64(self.digest),
        }
        return merge(self.raw, known)


@dataclass(frozen=True)
class Luks2Segment:
    """A ``crypt`` data segment. ``size`` None is ``"dynamic"`` (to the end of the device)."""

    offset: int
    size: int | None
    encryption: str = "aes-xts-plain64"
    sector_size: int = 512
    iv_tweak: int = 0
    flags: tuple[str, ...] = ()
    integrity: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = _raw()

    def iv_sector(self, payload_offset: int) -> int:
        """The IV (plain64 sector number) of the sector at byte ``payload_offset`` of the payload.

        Always in 512-byte units plus ``iv_tweak``: a 4096-byte sector ``n`` has IV ``iv_tweak + 8 * n``.
        """
        return self.iv_tweak + payload_offset // IV_SECTOR

    def payload_size(self, device_size: int) -> int:
        """Bytes of payload on a device of ``device_size`` bytes."""
        if self.size is not None:
            return self.size
        usable = max(0, device_size - self.offset)
        return usable - usable % self.sector_size

    def to_json(self) -> JsonObject:
        known: JsonObject = {
            "type": "crypt",
            "offset": str(self.offset),
            "size": "dynamic" if self.size is None else str(self.size),
            "iv_tweak": str(self.iv_tweak),
            "encryption": self.encryption,
            "sector_size": self.sector_size,
        }
        drop: tuple[str, ...] = ()
        if self.integrity is not None:
            known["integrity"] = dict(self.integrity)
        else:
            drop += ("integrity",)
        if self.flags or "flags" in self.raw:
            known["flags"] = list(self.flags)
        return merge(self.raw, known, drop=drop)


@dataclass(frozen=True)
class Luks2Token:
    """A token of any type; ``data`` is its whole JSON object, kept as is."""

    type: str
    keyslots: tuple[int, ...]
    data: Mapping[str, Any] = field(default_factory=_empty)

    def to_json(self) -> JsonObject:
        return merge(self.data, {"type": self.type, "keyslots": [str(k) for k in self.keyslots]})


@dataclass(frozen=True)
class Luks2Config:
    json_size: int
    keyslots_size: int
    flags: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()
    """``requirements.mandatory``; keysteward refuses any, so a parsed header always has none."""
    raw: Mapping[str, Any] = _raw()

    def to_json(self) -> JsonObject:
        known: JsonObject = {"json_size": str(self.json_size), "keyslots_size": str(self.keyslots_size)}
        if self.flags or "flags" in self.raw:
            known["flags"] = list(self.flags)
        if self.requirements:
            requirements = dict(self.raw.get("requirements") or {})
            requirements["mandatory"] = list(self.requirements)
            known["requirements"] = requirements
        return merge(self.raw, known)


@dataclass(frozen=True)
class Luks2Metadata:
    """The LUKS2 JSON metadata: numbered keyslots, tokens, segments, digests, and the config."""

    keyslots: Mapping[int, Luks2Keyslot]
    tokens: Mapping[int, Luks2Token]
    segments: Mapping[int, Luks2Segment]
    digests: Mapping[int, Luks2Digest]
    config: Luks2Config
    raw: Mapping[str, Any] = _raw()

    @property
    def metadata_size(self) -> int:
        """One header copy: binary header plus JSON area (``hdr_size``)."""
        return self.config.json_size + BINARY_HEADER_SIZE

    @property
    def keyslots_offset(self) -> int:
        """Start of the keyslots area, right after the two header copies."""
        return 2 * self.metadata_size

    @property
    def keyslots_end(self) -> int:
        """End of the keyslots area: metadata, both copies and keyslots take ``[0, keyslots_end)``."""
        return self.keyslots_offset + self.config.keyslots_size

    @property
    def data_offset(self) -> int:
        """Byte offset of the first data segment."""
        return min(segment.offset for segment in self.segments.values())

    def digest_of_keyslot(self, keyslot: int) -> int | None:
        """Id of the digest that keyslot ``keyslot`` is bound to (None for an unbound keyslot)."""
        for digest_id, digest in self.digests.items():
            if keyslot in digest.keyslots:
                return digest_id
        return None

    def to_json(self) -> JsonObject:
        known: JsonObject = {
            "keyslots": {str(k): v.to_json() for k, v in self.keyslots.items()},
            "tokens": {str(k): v.to_json() for k, v in self.tokens.items()},
            "segments": {str(k): v.to_json() for k, v in self.segments.items()},
            "digests": {str(k): v.to_json() for k, v in self.digests.items()},
            "config": self.config.to_json(),
        }
        return merge(self.raw, known)
