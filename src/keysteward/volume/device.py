"""A volume's backing store: a regular file or a block device, read and written at byte offsets.

Every I/O is ``pread``/``pwrite`` on one descriptor (no shared file position, safe from several
threads). A device opened for writing holds an exclusive ``flock`` for as long as it is open, so two
keysteward processes never change one volume at the same time; a block device opened for writing is
also opened ``O_EXCL`` (the kernel refuses it while it is mounted or mapped). Every ``OSError`` becomes
a :class:`~keysteward.errors.KeystewardError` naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from types import TracebackType

from keysteward.volume.errors import BUSY, VolumeConflict, VolumeIOError, io_error, option_error

Buffer = bytes | bytearray | memoryview


class Device:
    """An open file or block device; use :meth:`open` or :meth:`create_file`."""

    __slots__ = ("_fd", "created", "is_block", "path", "size", "writable")

    def __init__(self, path: str, fd: int, size: int, *, is_block: bool, writable: bool, created: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self.size = size
        self.is_block = is_block
        self.writable = writable
        self.created = created

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, writable: bool = False, shared: bool = False) -> Device:
        """Open an existing file or block device (writable: locked exclusively, unless ``shared``: a live
        migration's destination opens the disk while the source's host agent still holds it)."""
        try:
            info = os.stat(path)
        except OSError as exc:
            raise io_error(exc, "open", path) from exc
        is_block = stat.S_ISBLK(info.st_mode)
        if not (is_block or stat.S_ISREG(info.st_mode)):
            raise option_error(f"{path} is not a regular file or a block device")
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if writable and is_block and not shared:
            flags |= os.O_EXCL
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise io_error(exc, "open", path) from exc
        return cls._finish(path, fd, writable=writable, created=False, lock=not shared)

    @classmethod
    def create_file(cls, path: str, size: int) -> Device:
        """Create a new regular file of ``size`` bytes (sparse, mode 0600), locked exclusively."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error(exc, "create", path) from exc
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(path)
            raise io_error(exc, "size", path) from exc
        return cls._finish(path, fd, writable=True, created=True)

    @classmethod
    def _finish(cls, path: str, fd: int, *, writable: bool, created: bool, lock: bool = True) -> Device:
        try:
            info = os.fstat(fd)
            is_block = stat.S_ISBLK(info.st_mode)
            size = os.lseek(fd, 0, os.SEEK_END) if is_block else info.st_size
            if writable and lock:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise VolumeConflict(
                        f"{path} is in use: another keysteward process is changing it", code=BUSY
                    ) from exc
        except OSError as exc:
            os.close(fd)
            raise io_error(exc, "open", path) from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, is_block=is_block, writable=writable, created=created)

    # -- I/O ---------------------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise VolumeIOError(f"{self.path} is closed")
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; a short read (end of device) is an error."""
        buf = bytearray(length)
        self.preadinto(offset, memoryview(buf))
        return bytes(buf)

    def preadinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset``; a short read (end of device) is an error."""
        done, total = 0, view.nbytes
        while done < total:
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise io_error(exc, "read", self.path) from exc
            if n == 0:
                raise VolumeIOError(f"cannot read {self.path}: it ends at {offset + done}, {total - done} bytes short")
            done += n

    def preadinto_cached(self, offset: int, view: memoryview) -> bool:
        """Fill ``view`` from ``offset`` only if the page cache holds all of it (``RWF_NOWAIT``): False, with
        nothing promised about ``view``, when the read would wait for the disk or the system cannot tell."""
        flag = getattr(os, "RWF_NOWAIT", None)
        if flag is None:
            return False
        try:
            n = os.preadv(self.fd, [view], offset, flag)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise io_error(exc, "read", self.path) from exc
        return n == view.nbytes

    def pwrite(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data)
        done = 0
        while done < view.nbytes:
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise io_error(exc, "write", self.path) from exc

    def advise_sequential(self, offset: int, length: int) -> None:
        """Tell the kernel a long sequential read follows (larger readahead); a hint, never an error."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is not None:
            try:
                advise(self.fd, offset, length, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass

    def map_range(self, offset: int, length: int) -> tuple[mmap.mmap, memoryview] | None:
        """A read-only shared mapping of ``[offset, offset + length)`` and a view of exactly those bytes, or
        None when the range lies (partly) beyond the device's size or the kernel refuses to map it.

        Readers decrypt straight from the page cache this way (no copy into a buffer of ours). The caller
        releases the view, then closes the mapping. A file truncated by another process while mapped
        would fault (SIGBUS) on the missing pages; keysteward never truncates a volume it is using.
        """
        if offset < 0 or length <= 0 or offset + length > self.size:
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(self.fd, offset + length - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
        except (OSError, ValueError, OverflowError):
            return None
        return mapping, memoryview(mapping)[offset - start :]

    def fsync(self) -> None:
        """Make what was written durable: ``fdatasync``, as QEMU's own file driver does for a guest's flush
        (the data and what is needed to read it back; not the timestamps, whose journal commit would wait
        for every other file's data in flight on the same filesystem)."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise io_error(exc, "sync", self.path) from exc

    def close(self) -> None:
        """Close (and so unlock) the device; closing twice is harmless."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def remove_if_created(self) -> None:
        """Close, and delete the file if :meth:`create_file` made it (a create that failed)."""
        self.close()
        if self.created:
            _unlink_quietly(self.path)

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "block device" if self.is_block else "file"
        return f"<Device {self.path!r} {kind} {self.size} bytes{' rw' if self.writable else ''}>"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
