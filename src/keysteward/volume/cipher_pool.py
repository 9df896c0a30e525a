"""The XTS ciphers of one unlocked volume, pooled, and the one lent whole to native code.

A thread borrows a cipher per chunk, so concurrent chunks run on separate ciphers (as many as ever ran at
once); :meth:`CipherPool.lend_native` lends one for as long as native code (the NBD data plane) serves a
connection. :meth:`CipherPool.close` closes them all, which wipes the native key schedules.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

from keysteward.crypto.secret import SecretBuffer
from keysteward.crypto.xts import XtsCipher
from keysteward.formats.luks.errors import unsupported
from keysteward.volume.header_io import Geometry


class NativeTarget(NamedTuple):
    """What native code needs to serve a volume's payload (see :meth:`CipherPool.lend_native`)."""

    cipher: Any
    """The lent cipher's native context (cffi ``ks_xts *``)."""
    fd: int
    data_offset: int
    payload_size: int
    iv_tweak: int
    sector_size: int


class CipherPool:
    """Ciphers made from ``key`` (owned by the caller) for ``geometry``'s sectors."""

    def __init__(self, key: SecretBuffer, geometry: Geometry) -> None:
        self._key = key
        self._geometry = geometry
        self._made: list[XtsCipher] = []
        self._idle: list[XtsCipher] = []
        self._lock = threading.Lock()
        with self.cipher():  # fail early (bad key size, equal halves) in the caller's thread
            pass

    def __len__(self) -> int:
        """How many ciphers were made (what ran at once, at most)."""
        return len(self._made)

    def _borrow(self) -> XtsCipher:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            cipher = XtsCipher(self._key.view(), self._geometry.sector_size)
        except ValueError as exc:
            raise unsupported(f"the volume key cannot be used for aes-xts: {exc}") from exc
        with self._lock:
            self._made.append(cipher)
        return cipher

    @contextlib.contextmanager
    def cipher(self) -> Iterator[XtsCipher]:
        """A cipher no other thread is using for the ``with`` block (one call at a time per cipher)."""
        cipher = self._borrow()
        try:
            yield cipher
        finally:
            with self._lock:
                self._idle.append(cipher)

    @contextlib.contextmanager
    def lend_native(self, fd: int) -> Iterator[NativeTarget | None]:
        """A cipher lent whole for the ``with`` block to native code that reads and writes the device (``fd``)
        itself, with where the payload lies; None without the native extension. The caller keeps
        :meth:`close` from running meanwhile (the export counts the connection in flight)."""
        with self.cipher() as cipher:
            handle = cipher.native_handle
            g = self._geometry
            yield (
                None
                if handle is None
                else NativeTarget(handle, fd, g.data_offset, g.payload_size, g.iv_tweak, g.sector_size)
            )

    def close(self) -> None:
        """Close every cipher (the native key schedules are wiped)."""
        with self._lock:
            ciphers, self._made, self._idle = self._made, [], []
        for cipher in ciphers:
            cipher.close()
