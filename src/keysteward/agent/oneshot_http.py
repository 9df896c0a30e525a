"""The boot unlock's HTTP transport to the key manager: the standard library's :mod:`http.client` alone.

``keysteward agent unlock`` makes three requests (challenge, release, and the end of a checked volume's
lease) and exits. httpx, its connection pool and h11 cost more to import than those requests take
(docs/agent.md, "Boot unlock: where the time goes"), so the one shot speaks HTTP/1.1 itself over one
kept-alive connection per key manager URL, with the same TLS context (the CA file, the client
certificate) an httpx client would get. The daemon, the host agent and the proxy keep httpx (a pool
shared by threads, proxies from the environment): :meth:`OneShotHttp.usable` says no when an HTTP proxy
is configured, and the caller then uses httpx too.

Not for threads: one request at a time. Errors are :func:`keysteward.api_errors.transport_error`'s, with
``not_sent`` saying whether the connection (TCP and TLS) failed before the request could leave.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import ssl
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from keysteward.api_errors import transport_error

_DROPPED_IDLE: Final = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
"""What a request on a connection the server closed meanwhile fails with, before any byte of an answer."""

PROXY_VARIABLES: Final = ("https_proxy", "http_proxy", "all_proxy")
"""httpx honours these (any case); a one-shot client does not, so it is not used when one is set."""


class OneShotHttp:
    """HTTP/1.1 requests to ``url`` + ``/v1`` over one connection, made when the first request needs it and
    made again when the server has closed it while idle."""

    def __init__(
        self, url: str, *, context: ssl.SSLContext | None, headers: Mapping[str, str], timeout: float, code: str
    ) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError("a URL without a host")  # split_urls has refused it already
        self.url = url
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/") + "/v1"
        self._context = context if parts.scheme == "https" else None
        self._headers = {"accept": "application/json", "user-agent": "keysteward-agent", **headers}
        self.timeout = timeout
        self._code = code
        self._conn: http.client.HTTPConnection | None = None

    @staticmethod
    def usable(environ: Mapping[str, str] | None = None) -> bool:
        """False when the environment names an HTTP proxy (httpx would use it; this client would not)."""
        names = {name.lower() for name, value in (environ if environ is not None else os.environ).items() if value}
        return not names.intersection(PROXY_VARIABLES)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def request(
        self, method: str, path: str, *, body: Mapping[str, Any] | None = None, params: Mapping[str, str] | None = None,
        extra_time: float = 0.0, limit: int,
    ) -> tuple[int, str, bytes]:  # fmt: skip
        """``(status, reason, content)`` of one request; ``content`` is cut at ``limit + 1`` bytes (the caller
        refuses an answer over ``limit``). ``extra_time``: a long poll's wait, added to the read timeout."""
        target = self._prefix + path + ("?" + urlencode(params) if params else "")
        headers = dict(self._headers)
        payload = None
        if body is not None:
            payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
            headers["content-type"] = "application/json"
        kept = self._conn
        conn = self._connect()
        try:
            return self._exchange(conn, method, target, payload, headers, extra_time, limit)
        except _DROPPED_IDLE as exc:
            self.close()
            if conn is not kept:  # a new connection dropped: nothing to ask again
                raise transport_error(exc, self.url, self._code, not_sent=False) from exc
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise transport_error(exc, self.url, self._code, not_sent=False) from exc
        # A kept-alive connection the server closed while idle, its FIN still in flight when _connect looked:
        # no byte of an answer came back. Asked once more on a new connection. The agent's requests bear it: a
        # challenge is safe, a release spends its nonce once (a second one applied is refused), a lease end
        # is idempotent.
        conn = self._connect()
        try:
            return self._exchange(conn, method, target, payload, headers, extra_time, limit)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise transport_error(exc, self.url, self._code, not_sent=False) from exc

    def _exchange(
        self, conn: http.client.HTTPConnection, method: str, target: str, payload: bytes | None,
        headers: dict[str, str], extra_time: float, limit: int,
    ) -> tuple[int, str, bytes]:  # fmt: skip
        if conn.sock is not None:
            conn.sock.settimeout(self.timeout + extra_time)
        conn.request(method, target, body=payload, headers=headers)
        response = conn.getresponse()
        content = response.read(limit + 1)
        if not response.isclosed():  # an answer over the limit: the rest is not read, the connection dropped
            self.close()
        elif response.will_close:
            self.close()
        return response.status, response.reason, content

    def _connect(self) -> http.client.HTTPConnection:
        """The open connection, or a new one (a failure here is ``not_sent``: no request left)."""
        if self._conn is not None and self._conn.sock is not None and not _idle_closed(self._conn.sock):
            return self._conn
        self.close()
        if self._context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=self._context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise transport_error(exc, self.url, self._code, not_sent=True) from exc
        self._conn = conn
        return conn


def _idle_closed(sock: Any) -> bool:
    """An idle kept-alive socket that is readable has been closed by the server (or sent junk): not reused."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
