"""LUKS2 (and LUKS1) volumes on files and block devices, with a userspace data path.

The header codec is :mod:`keysteward.formats.luks` (pure); the sector cipher is
:class:`keysteward.crypto.xts.XtsCipher`. This package does the I/O around them:

- ``device``: a file or block device, pread/pwrite, fsync, an exclusive lock while writing
- ``header_io``: read a LUKS1/LUKS2 header from a device; write changes in a crash-safe order
- ``luks_volume``: :class:`LuksVolume`, an unlocked volume (key in a locked buffer, wiped on close)
- ``datapath``: payload reads and writes at byte offsets, whole sectors, chunked, on several cores
- ``create``: a new volume; ``keyslots``: add and remove keyslots; ``kdf``: KDF choice for new keyslots
- ``dump``: a header described without key material; ``keyfile``: passphrases from key files
- ``sizes``: sizes like 64M, and the Argon2 memory this machine affords; ``errors``: this layer's errors

The names below load their module on first use, so that ``keysteward volume check`` imports only
what it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keysteward.volume.create import Created, CreateOptions, create_volume
    from keysteward.volume.device import Device
    from keysteward.volume.dump import describe, render
    from keysteward.volume.errors import VolumeConflict, VolumeIOError, VolumeNotFound, VolumeRequestError
    from keysteward.volume.header_io import Geometry, VolumeHeader, read_header
    from keysteward.volume.kdf import KdfChoice
    from keysteward.volume.keyfile import read_key_file
    from keysteward.volume.keyslots import KeyslotAdded, add_key, remove_key
    from keysteward.volume.luks_volume import LuksVolume
    from keysteward.volume.sizes import argon2_limit_kib, parse_size

_HOMES = {
    "CreateOptions": "create",
    "Created": "create",
    "create_volume": "create",
    "Device": "device",
    "describe": "dump",
    "render": "dump",
    "VolumeConflict": "errors",
    "VolumeIOError": "errors",
    "VolumeNotFound": "errors",
    "VolumeRequestError": "errors",
    "Geometry": "header_io",
    "VolumeHeader": "header_io",
    "read_header": "header_io",
    "KdfChoice": "kdf",
    "read_key_file": "keyfile",
    "KeyslotAdded": "keyslots",
    "add_key": "keyslots",
    "remove_key": "keyslots",
    "LuksVolume": "luks_volume",
    "argon2_limit_kib": "sizes",
    "parse_size": "sizes",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "CreateOptions",
    "Created",
    "Device",
    "Geometry",
    "KdfChoice",
    "KeyslotAdded",
    "LuksVolume",
    "VolumeConflict",
    "VolumeHeader",
    "VolumeIOError",
    "VolumeNotFound",
    "VolumeRequestError",
    "add_key",
    "argon2_limit_kib",
    "create_volume",
    "describe",
    "parse_size",
    "read_header",
    "read_key_file",
    "remove_key",
    "render",
]
