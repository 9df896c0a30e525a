"""LUKS2 keyslots and digests as pure functions: open, verify, create, add, remove.

Opening a keyslot: derive the area key from the passphrase (the keyslot's KDF), decrypt the area's
split material (``aes-xts-plain64``, 512-byte sectors, IV 0 at the area start), AF-merge it into a
candidate volume key, and check that against the keyslot's ``pbkdf2`` digest. The KDF and the area
cipher are parameters (:data:`~keysteward.formats.luks.kdf.Kdf`,
:data:`~keysteward.formats.luks.areacipher.AreaCipher`) so that callers and tests can supply their own.

Volume keys come back as ``bytearray`` for the caller to move into a locked buffer and wipe;
intermediate buffers here are wiped on a best-effort basis.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from keysteward.formats.luks.afsplit import af_merge, af_size, af_split
from keysteward.formats.luks.areacipher import AreaCipher, check_area_encryption, xts_area_cipher
from keysteward.formats.luks.common import RandomSource, Write
from keysteward.formats.luks.errors import ARGON2_MEMORY, FULL, LuksFormatError, LuksWrongPassphrase, unsupported
from keysteward.formats.luks.hashes import digest_size, pbkdf2
from keysteward.formats.luks.kdf import DEFAULT_MAX_MEMORY_KIB, SALT_SIZE, Kdf, KdfParams, check_memory, derive_key
from keysteward.formats.luks.luks2_json import MAX_KEYSLOTS
from keysteward.formats.luks.luks2_model import (
    AntiForensic,
    KeyslotArea,
    Luks2Digest,
    Luks2Keyslot,
    Luks2Metadata,
    frozen_map,
)

AREA_ALIGN = 4096

Reader = Callable[[int, int], bytes]
"""``read(offset, length) -> bytes`` of the device; how :func:`unlock` gets keyslot areas."""


def _wipe(buf: bytearray | None) -> None:
    if buf is not None:
        buf[:] = bytes(len(buf))


def _kdf(kdf: Kdf | None, max_memory_kib: int) -> Kdf:
    return kdf if kdf is not None else partial(derive_key, max_memory_kib=max_memory_kib)


# -- digests ----------------------------------------------------------------------------------------


def make_digest(
    volume_key: bytes | bytearray,
    *,
    keyslots: tuple[int, ...] = (),
    segments: tuple[int, ...] = (0,),
    hash: str = "sha256",
    iterations: int = 1000,
    rng: RandomSource = os.urandom,
) -> Luks2Digest:
    """A ``pbkdf2`` digest of ``volume_key`` (as long as the hash's output, like cryptsetup)."""
    salt = rng(SALT_SIZE)
    value = pbkdf2(hash, volume_key, salt, iterations, digest_size(hash))
    return Luks2Digest(keyslots, segments, hash, iterations, salt, bytes(value))


def verify_digest(digest: Luks2Digest, volume_key: bytes | bytearray) -> None:
    """Raise :class:`LuksWrongPassphrase` unless ``volume_key`` matches ``digest`` (constant-time compare)."""
    value = pbkdf2(digest.hash, volume_key, digest.salt, digest.iterations, len(digest.digest))
    try:
        if not hmac.compare_digest(bytes(value), digest.digest):
            raise LuksWrongPassphrase("the key does not match the volume key digest")
    finally:
        _wipe(value)


# -- opening ----------------------------------------------------------------------------------------


def keyslot_span(keyslot: Luks2Keyslot) -> tuple[int, int]:
    """``(offset, length)``: the bytes of the device that hold this keyslot's split material."""
    return keyslot.area.offset, af_size(keyslot.key_size, keyslot.af.stripes)


def decrypt_keyslot(
    keyslot: Luks2Keyslot,
    material: bytes,
    passphrase: bytes | bytearray,
    *,
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
    max_memory_kib: int = DEFAULT_MAX_MEMORY_KIB,
) -> bytearray:
    """The candidate volume key in ``keyslot`` (unverified): ``material`` is the span of :func:`keyslot_span`."""
    _, length = keyslot_span(keyslot)
    if len(material) < length:
        raise LuksFormatError(f"keyslot material is {len(material)} bytes, {length} needed")
    check_area_encryption(keyslot.area.encryption, keyslot.area.key_size)
    check_memory(keyslot.kdf, max_memory_kib)
    area_key = _kdf(kdf, max_memory_kib)(keyslot.kdf, passphrase, keyslot.area.key_size)
    plain: bytearray | None = None
    try:
        plain = bytearray(cipher(keyslot.area.encryption, area_key, material[:length], True))
        return af_merge(plain, keyslot.key_size, keyslot.af.hash, keyslot.af.stripes)
    finally:
        _wipe(area_key)
        _wipe(plain)


def open_keyslot(
    metadata: Luks2Metadata,
    keyslot_id: int,
    material: bytes,
    passphrase: bytes | bytearray,
    *,
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
    max_memory_kib: int = DEFAULT_MAX_MEMORY_KIB,
) -> bytearray:
    """The volume key from keyslot ``keyslot_id``, verified against its digest; raises
    :class:`LuksWrongPassphrase` if the passphrase does not open it."""
    keyslot = metadata.keyslots.get(keyslot_id)
    if keyslot is None:
        raise LuksFormatError(f"there is no keyslot {keyslot_id}")
    digest_id = metadata.digest_of_keyslot(keyslot_id)
    if digest_id is None:
        raise unsupported(f"keyslot {keyslot_id} is not bound to a digest (an unbound keyslot)")
    key = decrypt_keyslot(keyslot, material, passphrase, kdf=kdf, cipher=cipher, max_memory_kib=max_memory_kib)
    try:
        verify_digest(metadata.digests[digest_id], key)
    except BaseException:
        _wipe(key)
        raise
    return key


@dataclass(frozen=True)
class Unlocked:
    keyslot: int
    digest: int
    volume_key: bytearray

    def __repr__(self) -> str:
        return f"Unlocked(keyslot={self.keyslot}, digest={self.digest}, volume_key=<{len(self.volume_key)} bytes>)"


def unlock(
    metadata: Luks2Metadata,
    read: Reader,
    passphrase: bytes | bytearray,
    *,
    keyslot: int | None = None,
    segment: int = 0,
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
    max_memory_kib: int = DEFAULT_MAX_MEMORY_KIB,
) -> Unlocked:
    """Try the keyslots that unlock ``segment`` (or only ``keyslot``) in cryptsetup's order: priority
    "prefer" first, then normal; "ignore" only when asked for by number.

    Raises :class:`LuksWrongPassphrase` if none opens, or ``luks_argon2_memory`` if none opened and
    at least one was skipped for needing more Argon2 memory than ``max_memory_kib``.
    """
    if keyslot is not None:
        candidates = [keyslot]
    else:
        bound = [
            n for n in metadata.keyslots
            if (d := metadata.digest_of_keyslot(n)) is not None and segment in metadata.digests[d].segments
        ]  # fmt: skip
        candidates = [n for n in bound if metadata.keyslots[n].priority == 2]
        candidates += [n for n in bound if metadata.keyslots[n].priority in (None, 1)]
    memory_error: LuksFormatError | None = None
    for number in candidates:
        slot = metadata.keyslots.get(number)
        if slot is None:
            raise LuksFormatError(f"there is no keyslot {number}")
        offset, length = keyslot_span(slot)
        material = read(offset, length)
        try:
            key = open_keyslot(
                metadata, number, material, passphrase, kdf=kdf, cipher=cipher, max_memory_kib=max_memory_kib
            )
        except LuksWrongPassphrase:
            continue
        except LuksFormatError as exc:
            if exc.code != ARGON2_MEMORY or keyslot is not None:
                raise
            memory_error = exc
            continue
        digest_id = metadata.digest_of_keyslot(number)
        assert digest_id is not None
        return Unlocked(number, digest_id, key)
    if memory_error is not None:
        raise memory_error
    raise LuksWrongPassphrase("no keyslot opens with this passphrase")


# -- creating ---------------------------------------------------------------------------------------


def area_size_for(key_size: int, stripes: int = 4000) -> int:
    """Keyslot area size for a key of ``key_size`` bytes (split material rounded up to 4 KiB)."""
    size = af_size(key_size, stripes)
    return (size + AREA_ALIGN - 1) // AREA_ALIGN * AREA_ALIGN


def allocate_area(metadata: Luks2Metadata, key_size: int) -> tuple[int, int]:
    """``(offset, size)`` of the first free gap in the keyslots area that holds a keyslot for ``key_size``."""
    size = area_size_for(key_size)
    offset = metadata.keyslots_offset
    for start, stop in sorted((k.area.offset, k.area.offset + k.area.size) for k in metadata.keyslots.values()):
        if offset + size <= start:
            break
        offset = max(offset, (stop + AREA_ALIGN - 1) // AREA_ALIGN * AREA_ALIGN)
    if offset + size > metadata.keyslots_end:
        raise LuksFormatError(f"no room for another keyslot of {size} bytes in the keyslots area", code=FULL)
    return offset, size


def make_keyslot(
    volume_key: bytes | bytearray,
    passphrase: bytes | bytearray,
    *,
    kdf_params: KdfParams,
    area_offset: int,
    area_size: int | None = None,
    encryption: str = "aes-xts-plain64",
    area_key_size: int | None = None,
    af_hash: str = "sha256",
    priority: int | None = None,
    kdf: Kdf | None = None,
    cipher: AreaCipher = xts_area_cipher,
    max_memory_kib: int = DEFAULT_MAX_MEMORY_KIB,
    rng: RandomSource = os.urandom,
) -> tuple[Luks2Keyslot, Write]:
    """A new keyslot holding ``volume_key`` under ``passphrase``, and the write that fills its area
    (encrypted split material, then zeros to the end of the area)."""
    key_size = len(volume_key)
    size = area_size_for(key_size) if area_size is None else area_size
    area_key_size = key_size if area_key_size is None else area_key_size
    check_area_encryption(encryption, area_key_size)
    if size < af_size(key_size):
        raise LuksFormatError(f"keyslot area of {size} bytes cannot hold {af_size(key_size)}")
    check_memory(kdf_params, max_memory_kib)
    split = af_split(volume_key, af_hash, rng=rng)
    split += bytes(af_size(key_size) - len(split))
    area_key = _kdf(kdf, max_memory_kib)(kdf_params, passphrase, area_key_size)
    try:
        encrypted = cipher(encryption, area_key, bytes(split), False)
    finally:
        _wipe(area_key)
        _wipe(split)
    keyslot = Luks2Keyslot(
        key_size=key_size,
        area=KeyslotArea(area_offset, size, encryption, area_key_size),
        kdf=kdf_params,
        af=AntiForensic(af_hash),
        priority=priority,
    )
    return keyslot, Write(area_offset, encrypted + bytes(size - len(encrypted)))


def add_keyslot(
    metadata: Luks2Metadata, keyslot: Luks2Keyslot, *, keyslot_id: int | None = None, digest_id: int | None = None
) -> tuple[int, Luks2Metadata]:
    """``metadata`` with ``keyslot`` added (lowest free id unless given) and bound to ``digest_id``
    (default: the digest of segment 0)."""
    if keyslot_id is None:
        keyslot_id = next((n for n in range(MAX_KEYSLOTS) if n not in metadata.keyslots), -1)
        if keyslot_id < 0:
            raise LuksFormatError(f"all {MAX_KEYSLOTS} keyslots are in use", code=FULL)
    if not 0 <= keyslot_id < MAX_KEYSLOTS or keyslot_id in metadata.keyslots:
        raise LuksFormatError(f"keyslot {keyslot_id} is in use or out of range")
    if digest_id is None:
        digest_id = next((n for n, d in metadata.digests.items() if 0 in d.segments), -1)
    digest = metadata.digests.get(digest_id)
    if digest is None:
        raise LuksFormatError(f"there is no digest {digest_id} to bind keyslot {keyslot_id} to")
    keyslots = dict(metadata.keyslots)
    keyslots[keyslot_id] = keyslot
    digests = dict(metadata.digests)
    digests[digest_id] = replace(digest, keyslots=(*digest.keyslots, keyslot_id))
    return keyslot_id, replace(metadata, keyslots=frozen_map(keyslots), digests=frozen_map(digests))


def remove_keyslot(metadata: Luks2Metadata, keyslot_id: int) -> tuple[Luks2Metadata, Write]:
    """``metadata`` without keyslot ``keyslot_id`` (unbound from digests and tokens), and the write
    that wipes its area with zeros."""
    keyslot = metadata.keyslots.get(keyslot_id)
    if keyslot is None:
        raise LuksFormatError(f"there is no keyslot {keyslot_id}")
    keyslots = {n: k for n, k in metadata.keyslots.items() if n != keyslot_id}
    digests = {
        n: replace(d, keyslots=tuple(k for k in d.keyslots if k != keyslot_id)) if keyslot_id in d.keyslots else d
        for n, d in metadata.digests.items()
    }
    tokens = {
        n: replace(t, keyslots=tuple(k for k in t.keyslots if k != keyslot_id)) if keyslot_id in t.keyslots else t
        for n, t in metadata.tokens.items()
    }
    new = replace(metadata, keyslots=frozen_map(keyslots), digests=frozen_map(digests), tokens=frozen_map(tokens))
    return new, Write(keyslot.area.offset, bytes(keyslot.area.size))
