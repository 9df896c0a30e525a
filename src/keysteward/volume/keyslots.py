"""Adding and removing keyslots on a volume, with the crash-safe write order of ``header_io``.

``add_key``: unlock with an existing passphrase, make the new keyslot (LUKS2: any KDF, in the first
free gap of the keyslots area; LUKS1: PBKDF2 in the first disabled slot), write its area, then the
header. ``remove_key``: the passphrase must open a keyslot *other* than the one removed (as
``cryptsetup luksKillSlot`` asks for "any remaining passphrase"), the last keyslot is never removed;
the keyslot's area is wiped first, then the header drops it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from keysteward.crypto.secret import wipe_bytearray
from keysteward.formats import luks
from keysteward.volume.device import Device
from keysteward.volume.errors import LAST_KEYSLOT, VolumeConflict, option_error
from keysteward.volume.header_io import commit_luks1, commit_luks2, read_header
from keysteward.volume.kdf import KdfChoice, describe_kdf, new_kdf_params
from keysteward.volume.luks_volume import Passphrase, unlock_header
from keysteward.volume.sizes import argon2_limit_kib


@dataclass(frozen=True)
class KeyslotAdded:
    keyslot: int
    opened_with: int
    kdf: dict[str, object]


def add_key(
    path: str,
    passphrase: Passphrase,
    new_passphrase: Passphrase,
    *,
    kdf: KdfChoice | None = None,
    keyslot: int | None = None,
    max_memory_kib: int | None = None,
) -> KeyslotAdded:
    """Add a keyslot holding the volume key under ``new_passphrase``; ``passphrase`` opens an existing one."""
    kdf = kdf if kdf is not None else KdfChoice()
    limit = argon2_limit_kib(max_memory_kib)
    with Device.open(path, writable=True) as device:
        header = read_header(device)
        if header.luks1 is not None:
            kind = kdf.resolved_type("pbkdf2")
            if kind != "pbkdf2":
                raise option_error("LUKS1 keyslots use pbkdf2 only")
            kdf = replace(kdf, type="pbkdf2", hash=header.luks1.hash_spec)
        params = new_kdf_params(kdf, default_type="argon2id", limit_kib=limit)  # refuse before any KDF runs
        unlocked = unlock_header(device, header, passphrase, max_memory_kib=limit)
        key = unlocked.volume_key
        try:
            if header.luks1 is not None:
                assert isinstance(params, luks.Pbkdf2Params)
                new1, area = luks.set_luks1_keyslot(
                    header.luks1, key, new_passphrase, slot=keyslot, iterations=params.iterations
                )
                slot = keyslot if keyslot is not None else _new_luks1_slot(header.luks1, new1)
                commit_luks1(device, header, new1, before=[area])
            else:
                metadata = header.v2.metadata
                offset, size = luks.allocate_area(metadata, len(key))
                made, area = luks.make_keyslot(
                    key, new_passphrase, kdf_params=params, area_offset=offset, area_size=size, max_memory_kib=limit
                )
                slot, new2 = luks.add_keyslot(metadata, made, keyslot_id=keyslot)
                new2 = luks.validate_metadata(new2, device_size=device.size)
                commit_luks2(device, header, new2, before=[area])
        finally:
            wipe_bytearray(key)
    return KeyslotAdded(slot, unlocked.keyslot, describe_kdf(params))


def _new_luks1_slot(old: luks.Luks1Header, new: luks.Luks1Header) -> int:
    return next(n for n, (a, b) in enumerate(zip(old.keyslots, new.keyslots, strict=True)) if a != b)


def remove_key(path: str, keyslot: int, passphrase: Passphrase, *, max_memory_kib: int | None = None) -> int:
    """Remove ``keyslot``; ``passphrase`` must open another keyslot (returned). Never removes the last one."""
    with Device.open(path, writable=True) as device:
        header = read_header(device)
        slots = header.keyslot_ids()
        if keyslot not in slots:
            raise option_error(f"keyslot {keyslot} is not in use (in use: {', '.join(map(str, slots)) or 'none'})")
        if len(slots) == 1:
            raise VolumeConflict(
                f"keyslot {keyslot} is the last keyslot: removing it would make the volume unreadable forever",
                code=LAST_KEYSLOT,
            )
        unlocked = unlock_header(device, header, passphrase, max_memory_kib=max_memory_kib, exclude=keyslot)
        wipe_bytearray(unlocked.volume_key)
        if header.luks1 is not None:
            new1, wipe = luks.remove_luks1_keyslot(header.luks1, keyslot)
            commit_luks1(device, header, new1, before=[wipe])
        else:
            new2, wipe = luks.remove_keyslot(header.v2.metadata, keyslot)
            new2 = luks.validate_metadata(new2, device_size=device.size)
            commit_luks2(device, header, new2, before=[wipe])
    return unlocked.keyslot
