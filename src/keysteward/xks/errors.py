"""keysteward's errors in the XKS spec's terms: each stable ``code`` to one errorName (and its status).

An error the table does not know becomes ``InternalException`` with a log line naming its code (never
its text, which may name a key), as PyKMIP's servers do with unknown failures.
"""

from __future__ import annotations

import logging

from keysteward.errors import Denied, KeystewardError, RateLimited, Sealed, Unavailable
from keysteward.formats.xks_wire import XksError

log = logging.getLogger("keysteward.xks")

BY_CODE: dict[str, str] = {
    "key_not_found": "KeyNotFoundException",
    "xks_store_not_found": "KeyNotFoundException",
    "tenant_not_found": "KeyNotFoundException",
    "invalid_key_usage": "InvalidKeyUsageException",
    "key_disabled": "InvalidStateException",
    "key_destroyed": "InvalidStateException",
    "key_version_destroyed": "InvalidStateException",
    "key_version_not_found": "InvalidCiphertextException",
    "invalid_ciphertext": "InvalidCiphertextException",
    "authentication_failed": "InvalidCiphertextException",
}


def to_xks(exc: KeystewardError, request_id: str) -> XksError:
    """The XKS answer to an error of the access path for the call ``request_id`` (its kmsRequestId)."""
    if isinstance(exc, Denied):  # the message names the kmsRequestId and the policy's reason
        return XksError("AccessDeniedException", exc.message)
    name = BY_CODE.get(exc.code)
    if name is not None:
        return XksError(name, exc.message)
    if isinstance(exc, Sealed):
        return XksError("InternalException", "the key manager is sealed")
    if isinstance(exc, Unavailable):
        return XksError("DependencyTimeoutException", "the key manager's audit log or database did not answer in time")
    if isinstance(exc, RateLimited):
        return XksError("ThrottlingException", "the key manager is over its request rate")
    log.warning("xks call %s failed: %s", request_id[:128], exc.code)
    return XksError("InternalException", f"the key manager failed ({exc.code}); kmsRequestId {request_id[:128]}")
