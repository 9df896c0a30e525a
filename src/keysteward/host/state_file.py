"""The files and pipes a VM's state streams through: wide pipes, and a file written to disk behind the writer.

A snapshot must be on disk before the host reports it saved, but a single ``fsync`` at the end makes the
save wait for all of it at once (0.12 s per 330 MiB here, a third of QEMU's own save). :class:`WriteBehindFile`
asks the kernel to start writing back every :data:`WRITE_BEHIND` bytes as they are written
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so the closing ``fdatasync`` waits only for
the tail. Where the call is missing (not Linux), the closing sync does all the work, as before.

:func:`widen_pipe` makes a pipe hold :data:`PIPE_BYTES` (1 MiB, Linux's default ``pipe-max-size``) instead of
64 KiB, so QEMU goes on writing its stream while a segment is sealed and written, and stalls less.
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import os
from collections.abc import Callable
from typing import Any, Final

WRITE_BEHIND: Final = 8 << 20
PIPE_BYTES: Final = 1 << 20
_SYNC_FILE_RANGE_WRITE: Final = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn: Any = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def widen_pipe(fd: int, size: int = PIPE_BYTES) -> int:
    """Ask for a pipe buffer of ``size`` bytes; the size it has (a refusal leaves the pipe as it was)."""
    if not 4096 <= size <= 64 << 20:
        raise ValueError("a pipe buffer is 4 KiB to 64 MiB")
    try:
        return int(fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size))
    except OSError:  # over /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE, or in use
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))


class WriteBehindFile(io.RawIOBase):
    """A new file (``O_EXCL``, mode 0600) sent to disk behind its writer; :meth:`sync` makes it durable."""

    def __init__(self, path: str, *, every: int = WRITE_BEHIND) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._every = every
        self._written = 0
        self._started = 0  # bytes whose writeback has been started

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = os.write(self._fd, data)
        self._written += n
        if _sync_file_range is not None and self._written - self._started >= self._every:
            # errors here only mean the pages go later: the closing fdatasync reports any real failure
            _sync_file_range(self._fd, self._started, self._written - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = self._written
        return n

    @property
    def size(self) -> int:
        return self._written

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def sync_directory(path: str) -> None:
    """Make a rename in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
