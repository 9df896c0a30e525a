"""The files and pipes a VM's state streams through: wide pipes, and a file written to disk behind the writer.

A snapshot must be on disk before the host reports it saved, but a single ``fsync`` at the end makes the
save wait for all of it at once (0.12 s per 330 MiB here, a third of QEMU's own save). :class:`WriteBehindFile`
asks the kernel to start writing back every :data:`WRITE_BEHIND` bytes as they are written
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``, from a thread of its own), so the closing ``fdatasync`` waits only
for the tail. Where the call is missing (not Linux), the closing sync does all the work, as before.

:func:`widen_pipe` makes a pipe hold :data:`PIPE_BYTES` (1 MiB, Linux's default ``pipe-max-size``) instead of
64 KiB, so QEMU goes on writing its stream while a segment is sealed and written, and stalls less.
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import os
import queue
import threading
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
    """A new file (``O_EXCL``, mode 0600) sent to disk behind its writer; :meth:`sync` makes it durable.

    The writeback requests run on a thread of their own: ``sync_file_range`` blocks while the disk's queue
    is full, and the writer (draining QEMU's pipe) must not, or QEMU stalls behind it."""

    def __init__(self, path: str, *, every: int = WRITE_BEHIND) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._every = every
        self._written = 0
        self._started = 0  # bytes whose writeback has been asked for
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._flusher: threading.Thread | None = None
        if _sync_file_range is not None:
            self._flusher = threading.Thread(target=self._flush_ranges, name="ks-write-behind", daemon=True)
            self._flusher.start()

    def _flush_ranges(self) -> None:
        assert _sync_file_range is not None
        while (item := self._ranges.get()) is not None:
            # an error only means the pages go later: the closing fdatasync reports any real failure
            _sync_file_range(self._fd, item[0], item[1], _SYNC_FILE_RANGE_WRITE)

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = os.write(self._fd, data)
        self._written += n
        if self._flusher is not None and self._written - self._started >= self._every:
            self._ranges.put((self._started, self._written - self._started))
            self._started = self._written
        return n

    @property
    def size(self) -> int:
        return self._written

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._ranges.put(None)
            self._flusher.join()
            self._flusher = None

    def sync(self) -> None:
        self._stop_flusher()
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self.closed:
            self._stop_flusher()
            os.close(self._fd)
        super().close()


class ThreadedSink:
    """A sink that writes on a thread of its own, so the caller decrypts the next segment while the last
    one goes into QEMU's pipe (AES-GCM and the pipe write both release the GIL: the two overlap).

    :meth:`write` copies into one of ``depth`` buffers of its pool (blocking while all are in flight) and
    raises the writer's error, if it had one (QEMU closed the pipe). :meth:`close` waits for everything
    queued to be written, raises a writer's error, and wipes the pool (it held plaintext state)."""

    def __init__(self, dst: io.RawIOBase | Any, *, size: int = 1 << 20, depth: int = 3) -> None:
        self._dst = dst
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._pool = [bytearray(size) for _ in range(depth)]
        for buf in self._pool:
            self._free.put(buf)
        self._full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ks-state-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            try:
                if self._error is None:
                    view = memoryview(buf)[:n]
                    while view:
                        view = view[self._dst.write(view) :]
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread at its next write
                self._error = exc
            finally:
                self._free.put(buf)

    def write(self, data: Any) -> int:
        if self._error is not None:
            raise self._error
        view = memoryview(data).cast("B")
        for at in range(0, len(view), len(self._pool[0])):
            piece = view[at : at + len(self._pool[0])]
            buf = self._free.get()
            buf[: len(piece)] = piece
            self._full.put((buf, len(piece)))
        return len(view)

    def close(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()
        for buf in self._pool:
            buf[:] = bytes(len(buf))
        if self._error is not None:
            raise self._error


def sync_directory(path: str) -> None:
    """Make a rename in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
