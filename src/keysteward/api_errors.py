"""keysteward's HTTP answers turned into errors, in one place for every client (the CLI, the agent, the proxy).

An answer of 400 or more is a problem+json object (RFC 9457) with keysteward's stable ``code``; it becomes the
:class:`~keysteward.errors.KeystewardError` subclass of its status, carrying the server's code and a bounded
detail. A ``403`` with ``"decision": "denied"`` is a :class:`~keysteward.errors.Denied`. A client that retries
(the agent) asks for server errors (5xx) as :class:`~keysteward.errors.Unavailable` under its own code; the CLI
shows the server's code. A request that never got an answer is :class:`~keysteward.errors.Unavailable`, and a
certificate the client does not trust is named as such, with what to do about it. Each error says whether a
client with several URLs may try the next (``failover``, :mod:`keysteward.kms_failover`).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any, Final

from keysteward.errors import (
    BadRequest,
    Conflict,
    Denied,
    Forbidden,
    KeystewardError,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
)
from keysteward.kms_failover import LOST, NOT_SENT, REFUSED

if TYPE_CHECKING:
    import httpx

MAX_CODE: Final = 64
MAX_DETAIL: Final = 500
BY_STATUS: Final[dict[int, type[KeystewardError]]] = {
    400: BadRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
}  # fmt: skip


def _untrusted(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def transport_error(
    exc: httpx.HTTPError | Exception, url: str, code: str, *, not_sent: bool | None = None
) -> Unavailable:
    """No answer from ``url``: refused, timed out, or a TLS failure (a certificate not trusted says which file
    to give). Its ``failover``: NOT_SENT when no connection was made, LOST when the request may have left.
    ``not_sent``: whether the connection failed, for an error that is not httpx's (the boot unlock's
    :mod:`keysteward.agent.oneshot_http`); httpx's errors say it by their class."""
    error = _transport_error(exc, url, code)
    if not_sent is None:
        import httpx

        not_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    if not_sent and not _untrusted(exc):
        error.failover = NOT_SENT
    elif not _untrusted(exc):
        error.failover = LOST
    return error


def _transport_error(exc: httpx.HTTPError | Exception, url: str, code: str) -> Unavailable:
    if _untrusted(exc):
        return Unavailable(
            f"the key manager at {url} presented a certificate this client does not trust: give its CA with "
            "--ca-file or KEYSTEWARD_CA_FILE",
            code=code,
        )
    return Unavailable(f"cannot reach the key manager at {url}: {exc}", code=code)


def answer_error(
    status: int, body: Any, reason: str, url: str, *, unavailable_code: str | None = None
) -> KeystewardError | None:
    """The error an answer of ``status`` (with its decoded JSON ``body``, or None) stands for; None below 400.
    ``unavailable_code``: server errors (5xx) become :class:`Unavailable` with that code."""
    if status < 400:
        return None
    problem = body if isinstance(body, dict) else {}
    code = str(problem.get("code") or "http_error")[:MAX_CODE]
    detail = str(problem.get("detail") or reason)[:MAX_DETAIL]
    if status >= 500 and unavailable_code is not None:
        error: KeystewardError = Unavailable(
            f"the key manager at {url} answered {status}: {detail} ({code})", code=unavailable_code
        )
        error.failover = REFUSED if status == 503 else LOST
        return error
    if status == 403 and problem.get("decision") == "denied":
        return Denied(detail, code=code)
    error = BY_STATUS.get(status, KeystewardError)(detail, code=code)
    error.status = status
    if status >= 500:
        error.failover = REFUSED if status == 503 else LOST
    return error
