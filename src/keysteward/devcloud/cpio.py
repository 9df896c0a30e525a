"""A writer for the cpio "newc" archive format, the one the Linux kernel unpacks as an initramfs.

Only what an initramfs needs: directories, regular files, symlinks and character devices, written
with explicit modes and owner root, so that an unprivileged build can still hold ``/dev/console``.
Format: each entry is the 110-byte ASCII header ``070701`` + 13 eight-digit hex fields, the name
(NUL-terminated), padding to 4 bytes, the data, padding to 4 bytes; the archive ends with the
entry ``TRAILER!!!``.
"""

from __future__ import annotations

import stat
from typing import BinaryIO, Final

MAGIC: Final = b"070701"
TRAILER: Final = "TRAILER!!!"


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Appends entries to a binary stream; ``close()`` writes the trailer (not the stream's close)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("cpio archive already closed")
        if name.startswith("/") or "\0" in name or not name:
            raise ValueError(f"bad cpio entry name {name!r}")
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime: fixed, so the archive is reproducible
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        header = MAGIC + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded + _pad(len(header) + len(encoded)))
        self._out.write(data + _pad(len(data)))
        self._ino += 1

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        self._entry(TRAILER, 0)
        self._closed = True
