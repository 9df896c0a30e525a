"""Errors of the volume layer, on top of the LUKS codec's (:mod:`keysteward.formats.luks.errors`).

Every ``OSError`` of a device, an input or an output file is translated where it happens, so that
callers (the CLI, later the proxy) see only :class:`~keysteward.errors.KeystewardError`::

    BadRequest
    ├── LuksFormatError          bad_luks_header, luks_checksum, luks_unsupported, ... (the codec's)
    └── VolumeRequestError       volume_range      offset or length outside the payload
                                 volume_option     a size, sector size, key size, KDF... that is not valid
    Unauthenticated
    └── LuksWrongPassphrase      luks_wrong_passphrase (the codec's)
    NotFound
    └── VolumeNotFound           volume_not_found  a path that does not exist
    Conflict
    └── VolumeConflict           volume_busy       another process holds the volume's write lock
                                 volume_changed    the header changed on disk after it was read
                                 volume_exists     create over an existing LUKS header without --force
                                 volume_last_keyslot  removing the only keyslot
    KeystewardError
    └── VolumeIOError            volume_io         the operating system refused a read, write or open

Messages name paths, offsets and sizes, never key material.
"""

from __future__ import annotations

import errno

from keysteward.errors import BadRequest, Conflict, KeystewardError, NotFound

RANGE = "volume_range"
OPTION = "volume_option"
BUSY = "volume_busy"
CHANGED = "volume_changed"
EXISTS = "volume_exists"
LAST_KEYSLOT = "volume_last_keyslot"


class VolumeRequestError(BadRequest):
    """A request against a volume that cannot be served as asked (range, options)."""

    code = RANGE
    title = "Bad volume request"


class VolumeNotFound(NotFound):
    code = "volume_not_found"
    title = "No such volume or file"


class VolumeConflict(Conflict):
    """The volume's state forbids the operation now; ``code`` says which state."""

    code = BUSY
    title = "Volume conflict"


class VolumeIOError(KeystewardError):
    """The operating system refused an open, read, write or sync."""

    code = "volume_io"
    status = 500
    title = "Volume I/O error"


def option_error(message: str) -> VolumeRequestError:
    return VolumeRequestError(message, code=OPTION)


def io_error(exc: OSError, action: str, path: str) -> KeystewardError:
    """Translate an ``OSError`` of ``action`` ("open", "read"...) on ``path`` into a KeystewardError."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOENT:
        return VolumeNotFound(f"cannot {action} {path}: {reason}")
    return VolumeIOError(f"cannot {action} {path}: {reason}")
