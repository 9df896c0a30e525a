"""The OpenSSL objects behind Python's ssl module, for the few calls the module does not offer.

Python's ssl module gives no access to its ``SSL_CTX *`` or ``SSL *``, so they are read where CPython keeps
them: an ``_ssl._SSLContext`` begins with the object header and its ``SSL_CTX *``; an ``_ssl._SSLSocket``
with the header, a weak reference to its socket and then its ``SSL *``. That layout has been the same from
3.7 to 3.13. Callers use what is read only when :func:`layout_problem` finds nothing wrong (the object
header this module counts with, not a free-threaded build; ``_ssl`` linked against ``libssl.so.3``) and
after checking the pointer against the Python object it came from.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import Any

HEADER = 2 * ctypes.sizeof(ctypes.c_void_p)
"""``PyObject_HEAD``: the reference count and the type."""
SSL_AT = HEADER + ctypes.sizeof(ctypes.c_void_p)
"""``PySSLSocket.ssl``, after ``PyObject *Socket``."""
CTX_AT = HEADER
"""``PySSLContext.ctx``."""
LIBSSL = b"libssl.so.3"
log = logging.getLogger("keysteward.server")


@functools.cache
def layout_problem() -> str:
    """Why the pointers cannot be read in this process, or "" when they can."""
    import _ssl

    if object.__basicsize__ != HEADER or not (3, 7) <= sys.version_info[:2] <= (3, 13):
        return f"an interpreter whose ssl objects this module does not know ({sys.version.split()[0]})"
    try:
        with open(_ssl.__file__, "rb") as lib:
            linked = LIBSSL in lib.read()
    except (AttributeError, OSError):
        linked = False
    if not linked:
        return "the ssl module is not linked against libssl.so.3"
    return ""


def context_address(ctx: object) -> int | None:
    """The ``SSL_CTX *`` of an ``ssl.SSLContext`` (unchecked: see the module doc), None when it cannot be read."""
    if layout_problem() or type(ctx).__mro__[-2].__name__ != "_SSLContext":
        return None
    return ctypes.c_void_p.from_address(id(ctx) + CTX_AT).value or None


def socket_address(inner: object) -> int | None:
    """The ``SSL *`` of an ``_ssl._SSLSocket`` (unchecked: see the module doc), None when it cannot be read."""
    if layout_problem() or type(inner).__name__ != "_SSLSocket":
        return None
    return ctypes.c_void_p.from_address(id(inner) + SSL_AT).value or None


@functools.cache
def libssl() -> ctypes.CDLL | None:
    """The ``libssl.so.3`` the ssl module loaded (never another copy: ``RTLD_NOLOAD``), or None."""
    try:
        return ctypes.CDLL(LIBSSL.decode(), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None


def checked_context(ctx: object) -> tuple[int, ctypes.CDLL] | None:
    """The ``SSL_CTX *`` of ``ctx`` with the ``libssl`` to call, once the options OpenSSL reports at that
    address are the context's own; None (logged) when the pointer cannot be read or is not the context's."""
    address, lib = context_address(ctx), libssl()
    if address is None or lib is None:
        log.info("an OpenSSL context is out of reach: %s", layout_problem() or "no libssl")
        return None
    get_options = lib.SSL_CTX_get_options
    get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
    if get_options(address) != int(getattr(ctx, "options", -1)):
        log.warning("an OpenSSL context is out of reach: the address read is not the context's")
        return None
    return address, lib


def context_control(lib: ctypes.CDLL) -> Any:
    """``SSL_CTX_ctrl``, typed: (ctx, command, long argument, pointer argument) -> long."""
    control = lib.SSL_CTX_ctrl
    control.restype = ctypes.c_long
    control.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    return control
