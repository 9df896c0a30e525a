"""The one exception hierarchy of keysteward.

Every error raised on purpose derives from :class:`KeystewardError` and carries a stable
``code`` (used in API problem documents, CLI messages and audit records) and the HTTP
``status`` the API answers with. Messages never contain key material.

    KeystewardError
    ├── BadRequest            400  malformed or invalid input
    │   ├── InvalidCiphertext 400  ciphertext blob that does not parse or does not open
    │   └── InvalidShare      400  an unseal share that is malformed or from another server
    ├── Unauthenticated       401  no or bad credentials
    ├── Forbidden             403  authenticated, but the role may not do this
    │   └── Denied            403  a key release refused by the decision path (reason in ``code``)
    ├── NotFound              404  unknown tenant, key, version, token...
    ├── Conflict              409  duplicate name, state that forbids the operation
    ├── PayloadTooLarge       413
    ├── RateLimited           429  too many failures from one source (``retry_after`` seconds)
    ├── Sealed                503  the server is sealed; nothing that touches keys is served
    └── Unavailable           503  a dependency failed (audit write, HSM, database): fail closed
"""

from __future__ import annotations


class KeystewardError(Exception):
    """Base of every deliberate keysteward error."""

    code = "internal_error"
    status = 500
    title = "Internal error"
    failover: str | None = None
    """For a client with several key manager URLs: whether another may be tried (keysteward.kms_failover)."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def diagnostics(self) -> str:
        """A line an operator can act on."""
        return f"{self.code}: {self.message}"


class BadRequest(KeystewardError):
    code = "bad_request"
    status = 400
    title = "Bad request"


class InvalidCiphertext(BadRequest):
    code = "invalid_ciphertext"
    title = "Invalid ciphertext"


class InvalidShare(BadRequest):
    code = "invalid_share"
    title = "Invalid unseal share"


class Unauthenticated(KeystewardError):
    code = "unauthenticated"
    status = 401
    title = "Unauthenticated"


class Forbidden(KeystewardError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class Denied(Forbidden):
    """A release the decision path refused; ``code`` is the reason an operator can act on."""

    code = "denied"
    title = "Release denied"


class NotFound(KeystewardError):
    code = "not_found"
    status = 404
    title = "Not found"


class Conflict(KeystewardError):
    code = "conflict"
    status = 409
    title = "Conflict"


class PayloadTooLarge(KeystewardError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class RateLimited(KeystewardError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 0) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Sealed(KeystewardError):
    code = "sealed"
    status = 503
    title = "Server sealed"


class Unavailable(KeystewardError):
    code = "unavailable"
    status = 503
    title = "Service unavailable"
