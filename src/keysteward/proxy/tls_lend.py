"""A TLS connection's OpenSSL session, lent to the native data plane (``nbd_tls.c``) by address.

Python's ssl module gives no access to its ``SSL *``, so it is read where CPython keeps it
(:mod:`keysteward.crypto.openssl_handles`). What is read is not trusted: the session is lent only when

- the interpreter has the object header this module counts with (not a free-threaded build),
- ``_ssl`` is linked against ``libssl.so.3`` and the plane found that library already loaded, at the
  version the ssl module reports (so both call the one copy of OpenSSL that made the session), and
- ``SSL_get_SSL_CTX`` of the pointer read is the context's own ``SSL_CTX *``, read the same way.

Otherwise :func:`session` answers None and the connection stays on the Python path, which serves it the
same way, only slower. ``tests/integration/test_nbd_plane.py`` asserts that on the machines this project
supports TLS connections are lent.
"""

from __future__ import annotations

import functools
import logging
import ssl

from keysteward.crypto import openssl_handles
from keysteward.crypto.xts import native_module

log = logging.getLogger("keysteward.proxy")


@functools.cache
def available() -> bool:
    """Can sessions be lent in this process? (Decided once; the reason is logged when they cannot.)"""
    reason = _unavailable()
    if reason:
        log.info("nbd TLS connections stay on the Python path: %s", reason)
    return not reason


def _unavailable() -> str:
    problem = openssl_handles.layout_problem()
    if problem:
        return problem
    module = native_module()
    if module is None:
        return "the native extension is not built"
    version = module.ffi.new("unsigned long *")
    if module.lib.ks_tls_load(version) != 0:
        return "libssl.so.3 is not loaded or lacks a function the plane calls"
    if version[0] != ssl.OPENSSL_VERSION_NUMBER:
        return f"libssl.so.3 is {version[0]:#x}, the ssl module says {ssl.OPENSSL_VERSION_NUMBER:#x}"
    return ""


def session(ssl_object: ssl.SSLObject) -> int | None:
    """The ``SSL *`` of ``ssl_object`` as an address, checked against its context; None when it cannot be lent.
    The caller keeps ``ssl_object`` alive, and keeps every other user away from it, while the address is used."""
    if not available():
        return None
    inner = getattr(ssl_object, "_sslobj", None)
    context = ssl_object.context
    if inner is None or not isinstance(context, ssl.SSLContext):
        return None
    address = openssl_handles.socket_address(inner)
    ctx = openssl_handles.context_address(context)
    if not address or not ctx:
        return None
    module = native_module()
    assert module is not None  # available() said so
    ffi = module.ffi
    if not module.lib.ks_tls_owned_by(ffi.cast("void *", address), ffi.cast("void *", ctx)):
        log.warning("nbd TLS session not lent: the SSL object read is not one of its context's")
        return None
    return address
