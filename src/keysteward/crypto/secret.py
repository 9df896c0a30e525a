"""Locked, wipeable buffers for key material.

A :class:`SecretBuffer` lives in its own anonymous memory mapping: the pages are locked
(``mlock``) so they never reach swap, excluded from core dumps (``MADV_DONTDUMP``), and zeroed
by :meth:`SecretBuffer.wipe`. Python and OpenSSL may still hold transient copies while a
primitive runs; keysteward keeps its own long-lived copies only here.

A wiped one-page mapping that nothing else still views goes back to a small pool, zeroed, still locked
and out of core dumps, for the next buffer: making and locking a mapping costs three system calls and
unmapping two more, on every key a request unwraps.
"""

from __future__ import annotations

import ctypes
import mmap
import resource
import sys
import threading
from types import TracebackType


def _load_libc() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)  # glibc: no ctypes.util search (~10 ms per start)
    except OSError:
        from ctypes.util import find_library  # only here: importing it costs ~5 ms of every start

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()
_POOL: list[mmap.mmap] = []
"""Zeroed, locked, undumpable one-page mappings for the next buffers."""
_POOL_MAX = 64
_pool_lock = threading.Lock()


def _new_page(size: int) -> tuple[mmap.mmap, bool]:
    """A mapping of at least ``size`` bytes (whole pages), locked when it can be, excluded from core dumps."""
    length = max(size, mmap.PAGESIZE)
    mapping = mmap.mmap(-1, length)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    locked = _libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(length)) == 0
    if hasattr(mmap, "MADV_DONTDUMP"):
        mapping.madvise(mmap.MADV_DONTDUMP)
    return mapping, locked


def disable_core_dumps() -> None:
    """Keep this process's memory out of core files (called at server and agent start)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class SecretBuffer:
    """A fixed-size buffer of secret bytes, locked in RAM and wiped on close."""

    __slots__ = ("_c", "_len", "_locked", "_map", "_view")

    def __init__(self, size: int) -> None:
        if size <= 0 or size > 1 << 20:
            raise ValueError("secret buffer size out of range")
        self._len = size
        mapping: mmap.mmap | None = None
        if size <= mmap.PAGESIZE:
            with _pool_lock:
                mapping = _POOL.pop() if _POOL else None
        locked = mapping is not None  # only locked pages are pooled
        if mapping is None:
            mapping, locked = _new_page(size)
        self._map: mmap.mmap | None = mapping
        self._c = (ctypes.c_char * size).from_buffer(mapping)
        self._locked = locked
        self._view: memoryview | None = memoryview(mapping)[:size]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SecretBuffer:
        """Copy ``data`` in; a ``bytearray`` source is zeroed afterwards."""
        buf = cls(len(data))
        buf.view()[:] = data
        if isinstance(data, bytearray):
            wipe_bytearray(data)
        return buf

    @property
    def locked(self) -> bool:
        return bool(self._locked)

    @property
    def closed(self) -> bool:
        return self._map is None

    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("secret buffer is wiped")
        return self._view

    def bytes(self) -> bytes:
        """An immutable copy, for APIs that insist on ``bytes``; prefer :meth:`view`."""
        return bytes(self.view())

    def wipe(self) -> None:
        if self._map is None:
            return
        addr = ctypes.addressof(self._c)
        ctypes.memset(addr, 0, self._len)
        view, mapping = self._view, self._map
        self._view, self._map = None, None
        del self._c
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass  # something was made from the view itself: it keeps the mapping (zeroed) alive
        # pooled only when nothing but this frame refers to it: a caller's slice of view() holds a reference
        # (its buffer's owner), and must never see the next secret
        if self._locked and len(mapping) == mmap.PAGESIZE and sys.getrefcount(mapping) == 2:
            with _pool_lock:
                if len(_POOL) < _POOL_MAX:
                    _POOL.append(mapping)  # zeroed above, still locked and undumpable
                    return
        if self._locked:
            _libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(mapping)))
        try:
            mapping.close()
        except BufferError:
            # a caller still holds a slice of view(): the bytes are zeroed already; the mapping
            # is unmapped when that last slice goes away
            pass

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        state = "wiped" if self._map is None else f"{self._len} bytes"
        return f"<SecretBuffer {state}>"

    def __enter__(self) -> SecretBuffer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        try:
            self.wipe()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown; nothing left to report to
            pass


def wipe_bytearray(data: bytearray) -> None:
    """Zero a bytearray in place (through a memoryview, which cannot resize it: the very bytes are overwritten;
    a ctypes array over it cost five times as much)."""
    if data:
        memoryview(data)[:] = bytes(len(data))
