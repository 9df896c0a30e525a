"""AES-XTS for volume data, as dm-crypt's ``aes-xts-plain64``: many sectors per call.

Tweaks (the part that must match cryptsetup and dm-crypt bit for bit):

* The tweak of a sector is its 64-bit sector number, little-endian, zero-padded to 16 bytes
  (dm-crypt ``plain64``). For small numbers this equals IEEE 1619's data unit sequence number.
* ``sector_size`` is 512, 1024, 2048 or 4096 (what dm-crypt and LUKS2 allow).
* ``first_sector`` always counts **512-byte units**, whatever the sector size, and each data sector
  of ``sector_size`` bytes advances the tweak by ``sector_size // 512``: LUKS2 does not set
  dm-crypt's ``iv_large_sectors``, so with 4096-byte sectors the k-th sector of a call has the tweak
  ``first_sector + iv_shift + 8 * k``. For LUKS1/LUKS2, ``first_sector`` is the position inside
  the decrypted payload (byte offset in the payload // 512; the data offset of the payload on the
  disk does not count, as in dm-crypt) and ``iv_shift`` is the LUKS2 segment's ``iv_tweak``.
* ``iv_large_sectors=True`` (dm-crypt's option of that name; not used by LUKS) makes the tweak
  count data units of ``sector_size`` instead: ``first_sector`` and ``iv_shift`` are then in
  sector-size units and each sector advances the tweak by one. This also allows data units that
  are not a multiple of 512 bytes (any multiple of 16 from 16 to 4096), as in IEEE 1619.
* A tweak beyond 2^64 - 1 is refused (``ValueError``) rather than wrapped.

Keys are ``key1 || key2`` (32 bytes: AES-128-XTS, 64 bytes: AES-256-XTS), as dm-crypt and LUKS
store them. Keys whose halves are equal are refused both ways, as cryptsetup and OpenSSL 3 do.

Two implementations give the same bytes:

* the native fast path, ``keysteward.crypto._xts_native``, a cffi extension over the system crypto
  library built by ``pip install`` (see ``_xts_build.py``): one C call per request, the key set
  once per :class:`XtsCipher`, only the IV changes between sectors, the GIL released during the
  call (use one :class:`XtsCipher` per thread to use several cores);
* the reference path (:mod:`keysteward.crypto.xts_reference`, with the tweak arithmetic and the checks
  both paths share): one pyca/cryptography ``Cipher(AES(key), XTS(tweak))`` per sector; slow, obviously
  correct, and what :class:`XtsCipher` uses when the extension is missing (:func:`native_available`
  says which).
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from types import ModuleType, TracebackType
from typing import Any, Final

from keysteward.crypto.secret import SecretBuffer
from keysteward.crypto.xts_reference import (
    EQUAL_HALVES_ERROR,
    KEY_SIZE_ERROR,
    Buffer,
    byte_view,
    check_key,
    first_tweak,
    out_view,
    reference_into,
    sector_count,
    tweak_step,
)

_NATIVE_MODULE: Final = "keysteward.crypto._xts_native"
_OVERLAP: Final = 5

# Native error codes (KS_XTS_* in _xts_build.py) -> messages. XtsCipher checks keys and arguments
# before calling, and handles a partial overlap (5) itself; the rest is mapped for safety.
_NATIVE_ERRORS: Final = {
    1: KEY_SIZE_ERROR,
    2: EQUAL_HALVES_ERROR,
    3: "out of memory in the AES-XTS extension",
    4: "invalid arguments to the AES-XTS extension",
    5: "out must not partially overlap data",
    6: "the crypto library refused the AES-XTS operation",
}


# -- the native extension --------------------------------------------------------------------


@functools.cache
def native_module() -> ModuleType | None:
    """The cffi extension, or None when it was not built or does not load (imported once, lazily). The NBD
    data plane is compiled into it too (:mod:`keysteward.proxy.plane`, :mod:`keysteward.proxy.tls_lend`).

    CPython only: the allocating calls fill a fresh ``bytes`` in place (see :func:`_new_bytes`).
    """
    if sys.implementation.name != "cpython":  # pragma: no cover - keysteward runs on CPython
        return None
    try:
        return importlib.import_module(_NATIVE_MODULE)
    except ImportError:
        return None


def native_available() -> bool:
    """True when the native fast path is built and loads; :class:`XtsCipher` then uses it."""
    return native_module() is not None


def native_backend() -> str | None:
    """The crypto library the native path runs on (e.g. ``OpenSSL 3.0.x``), None without it."""
    module = native_module()
    if module is None:
        return None
    ffi: Any = module.ffi
    return str(ffi.string(module.lib.ks_xts_backend()).decode())


def _native_error(code: int) -> Exception:
    message = _NATIVE_ERRORS.get(code, f"AES-XTS extension error {code}")
    return MemoryError(message) if code == 3 else ValueError(message)


# -- the cipher --------------------------------------------------------------------------------


class XtsCipher:
    """AES-XTS with one key and sector size, for many calls of many sectors each.

    ``encrypt``/``decrypt`` take whole sectors (``len(data)`` a multiple of ``sector_size``, else
    ``ValueError``) and the sector number of the first one, in 512-byte units (see the module doc
    for the tweak rules, ``iv_shift`` and ``iv_large_sectors``). Without ``out`` they return new
    ``bytes``; with ``out`` (a writable buffer of at least ``len(data)`` bytes; it may be ``data``
    itself, for in-place work, or overlap it) they fill its first ``len(data)`` bytes and return a
    memoryview of them.

    The key lives only inside the native library's context (or, on the reference path, in a
    locked :class:`~keysteward.crypto.secret.SecretBuffer`); :meth:`close` wipes it. An instance
    may be shared by threads (calls are serialized); one instance per thread runs in parallel.
    ``native`` forces a path: True raises RuntimeError without the extension, False uses the
    reference path; None (default) picks the native one when available.
    """

    __slots__ = ("_closed", "_handle", "_key", "_lock", "_sector_size", "_step", "_use_native")

    def __init__(
        self,
        key: Buffer,
        sector_size: int,
        *,
        iv_large_sectors: bool = False,
        native: bool | None = None,
    ) -> None:
        key_view = byte_view(key, "key")
        check_key(key_view)
        self._step = tweak_step(sector_size, iv_large_sectors)
        self._sector_size = sector_size
        self._lock = threading.Lock()
        self._handle: Any = None
        self._key: SecretBuffer | None = None
        self._closed = False
        module = None if native is False else native_module()
        if native is True and module is None:
            raise RuntimeError(f"the native AES-XTS extension ({_NATIVE_MODULE}) is not built")
        self._use_native = module is not None
        if module is not None:
            ffi: Any = module.ffi
            lib: Any = module.lib
            slot = ffi.new("ks_xts **")
            code = lib.ks_xts_new(ffi.from_buffer(key_view), key_view.nbytes, slot)
            if code != 0:
                raise _native_error(code)
            self._handle = ffi.gc(slot[0], lib.ks_xts_free)
        else:
            self._key = SecretBuffer(key_view.nbytes)
            self._key.view()[:] = key_view

    @property
    def sector_size(self) -> int:
        return self._sector_size

    @property
    def native(self) -> bool:
        """True when this instance runs on the native fast path."""
        return self._use_native

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def native_handle(self) -> Any:
        """The native context (cffi ``ks_xts *``) for native code of the same extension; None on the reference
        path or once closed. Its lender keeps other threads off it (volume/cipher_pool.py)."""
        return self._handle

    def encrypt(
        self,
        data: Buffer,
        first_sector: int,
        *,
        out: bytearray | memoryview | None = None,
        iv_shift: int = 0,
    ) -> bytes | memoryview:
        """Encrypt whole sectors; ``first_sector`` in 512-byte units (see the class doc)."""
        return self._crypt(True, data, first_sector, out, iv_shift)

    def decrypt(
        self,
        data: Buffer,
        first_sector: int,
        *,
        out: bytearray | memoryview | None = None,
        iv_shift: int = 0,
    ) -> bytes | memoryview:
        """Decrypt whole sectors; ``first_sector`` in 512-byte units (see the class doc)."""
        return self._crypt(False, data, first_sector, out, iv_shift)

    def _crypt(
        self, encrypt: bool, data: Buffer, first_sector: int, out: bytearray | memoryview | None, iv_shift: int
    ) -> bytes | memoryview:
        if self._closed:  # checked again under the lock below, where it matters
            raise ValueError("XtsCipher is closed")
        src = byte_view(data, "data")
        count = sector_count(src, self._sector_size)
        first = first_tweak(first_sector, iv_shift, count, self._step)
        dst = None if out is None else out_view(out, src.nbytes)
        if count == 0:
            return b"" if dst is None else dst
        if not self._use_native:
            with self._lock:
                if self._key is None:
                    raise ValueError("XtsCipher is closed")
                key = bytes(self._key.view())
            result = bytearray(src.nbytes)  # then copied: out may overlap data in any way
            reference_into(encrypt, key, self._sector_size, src, memoryview(result), first, self._step)
            if dst is None:
                return bytes(result)
            dst[:] = result
            return dst
        if dst is None:
            fresh = _new_bytes(src.nbytes)
            self._native_crypt(encrypt, src, fresh, count, first)
            return fresh
        if not self._native_crypt(encrypt, src, dst, count, first):
            staging = bytearray(src.nbytes)  # out partially overlaps data: go through a copy
            self._native_crypt(encrypt, src, staging, count, first)
            dst[:] = staging
        return dst

    def _native_crypt(self, encrypt: bool, src: memoryview, dst: Buffer, count: int, first: int) -> bool:
        """One native call over ``count`` sectors; False when ``dst`` partially overlaps ``src``."""
        module = native_module()
        assert module is not None
        ffi: Any = module.ffi
        source = ffi.from_buffer(src)
        target = ffi.from_buffer(dst)  # writable: bytearray, writable memoryview or a fresh bytes
        with self._lock:  # the native context holds per-call state (the IV): one call at a time
            if self._handle is None:
                raise ValueError("XtsCipher is closed")
            code = module.lib.ks_xts_crypt(
                self._handle, 1 if encrypt else 0, source, target, count, self._sector_size, first, self._step
            )
        if code == _OVERLAP:
            return False
        if code != 0:
            raise _native_error(code)
        return True

    def close(self) -> None:
        """Free the native context (the library wipes the key schedule) or wipe the reference key."""
        with self._lock:
            self._closed = True
            handle, self._handle = self._handle, None
            key, self._key = self._key, None
        if handle is not None:
            module = native_module()
            assert module is not None
            module.ffi.release(handle)  # runs ks_xts_free now instead of at garbage collection
        if key is not None:
            key.wipe()

    def __enter__(self) -> XtsCipher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("native" if self._use_native else "reference")
        return f"<XtsCipher sector_size={self._sector_size} {state}>"


def _new_bytes(size: int) -> bytes:
    """A new, unshared ``bytes`` of ``size`` for the extension to fill before anyone else sees it.

    On CPython ``bytes(size)`` (size >= 2) is a fresh object, like ``PyBytes_FromStringAndSize(NULL,
    size)`` in C, and the extension writes it before it is returned: one allocation and no copy,
    which is what keeps the allocating call near the speed of ``out=``. Other interpreters (PyPy
    may move or copy bytes) never get here: :func:`native_module` is CPython-only.
    """
    return bytes(size)
