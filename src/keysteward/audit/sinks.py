"""Where signed audit checkpoints go: places outside the key manager's database.

``[audit] checkpoint_sinks`` lists them, one string each:

- ``file:PATH`` appends one JSON line per checkpoint to ``PATH`` (relative paths are under the data
  directory), written with one ``write`` on an ``O_APPEND`` descriptor and fsynced: the file is what
  ``keysteward audit verify --checkpoint FILE`` reads.
- ``syslog`` (``/dev/log``), ``syslog:/path/to/socket`` (a unix datagram socket) or
  ``syslog://HOST:PORT`` (UDP): one message per checkpoint, ident ``keysteward-audit``, facility
  ``authpriv``, priority ``info``; the message is the checkpoint's JSON line.
- ``http://...`` or ``https://...``: a webhook; each checkpoint is POSTed as a JSON object
  (``content-type: application/json``); any answer but 2xx is a failure.

A sink that fails raises :class:`SinkFailed` (code ``audit_sink_failed``); the publisher logs it and
tries again in the next round. Sinks log their ``label``, never a URL's credentials or query.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from logging.handlers import SysLogHandler
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from keysteward.errors import BadRequest, Unavailable

SYSLOG_IDENT = "keysteward-audit: "
DEFAULT_SYSLOG = "/dev/log"


class SinkFailed(Unavailable):
    code = "audit_sink_failed"


class Sink(Protocol):
    label: str

    def publish(self, lines: Sequence[str]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = f"file:{path}"

    def publish(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        data = "".join(line + "\n" for line in lines).encode("ascii")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:  # one write for the lot in practice; the loop only guards a short write
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SinkFailed(f"{self.label}: {exc.strerror or type(exc).__name__}") from exc

    def close(self) -> None:
        pass


class _RaisingSysLogHandler(SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        # emit calls this inside its ``except`` block: re-raise the OSError for the sink to translate,
        # where the stdlib would print a traceback to stderr and carry on as if delivered
        raise


class SyslogSink:
    """Through the standard library's syslog client (RFC 3164 framing, reconnects a dropped unix socket)."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        self.address = address
        self.label = f"syslog:{address}" if isinstance(address, str) else f"syslog://{address[0]}:{address[1]}"
        self._handler: SysLogHandler | None = None

    def _connect(self) -> SysLogHandler:
        if self._handler is None:
            handler = _RaisingSysLogHandler(
                address=self.address, facility=SysLogHandler.LOG_AUTHPRIV, socktype=socket.SOCK_DGRAM
            )
            handler.ident = SYSLOG_IDENT
            handler.append_nul = False
            self._handler = handler
        return self._handler

    def publish(self, lines: Sequence[str]) -> None:
        try:
            handler = self._connect()
            for line in lines:
                handler.emit(logging.LogRecord("keysteward.audit", logging.INFO, "", 0, line, None, None))
        except OSError as exc:
            self.close()
            raise SinkFailed(f"{self.label}: {exc.strerror or type(exc).__name__}") from exc

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            self._handler = None


class WebhookSink:
    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.url = url
        self.label = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        self.timeout = timeout
        self._client: httpx.Client | None = None

    def publish(self, lines: Sequence[str]) -> None:
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout)
        for line in lines:
            try:
                response = self._client.post(
                    self.url, content=line.encode("ascii"), headers={"content-type": "application/json"}
                )
            except httpx.HTTPError as exc:
                raise SinkFailed(f"{self.label}: {type(exc).__name__}") from exc
            if not response.is_success:
                raise SinkFailed(f"{self.label}: answered {response.status_code}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def parse_sink(spec: str, data_dir: Path, *, webhook_timeout: float = 5.0) -> Sink:
    """Build one sink from its ``checkpoint_sinks`` string; bad strings raise ``bad_setting``."""
    spec = spec.strip()
    if spec.startswith("file:"):
        raw = spec.removeprefix("file://") if spec.startswith("file://") else spec.removeprefix("file:")
        if not raw:
            raise BadRequest("audit checkpoint sink 'file:' needs a path", code="bad_setting")
        file_path = Path(raw)
        return FileSink(file_path if file_path.is_absolute() else data_dir / file_path)
    if spec == "syslog":
        return SyslogSink(DEFAULT_SYSLOG)
    if spec.startswith("syslog://"):
        parts = urlsplit(spec)
        try:
            port = parts.port or 514
        except ValueError as exc:
            raise BadRequest(f"audit checkpoint sink {spec!r}: bad port", code="bad_setting") from exc
        if not parts.hostname:
            raise BadRequest(f"audit checkpoint sink {spec!r} names no host", code="bad_setting")
        return SyslogSink((parts.hostname, port))
    if spec.startswith("syslog:"):
        path = spec.removeprefix("syslog:")
        if not path.startswith("/"):
            raise BadRequest("audit checkpoint sink 'syslog:PATH' needs an absolute socket path", code="bad_setting")
        return SyslogSink(path)
    if spec.startswith(("http://", "https://")):
        if not urlsplit(spec).hostname:
            raise BadRequest("audit checkpoint webhook names no host", code="bad_setting")
        return WebhookSink(spec, webhook_timeout)
    shown = spec.split("://", 1)[0].split(":", 1)[0][:20]  # the scheme only: never echo credentials
    raise BadRequest(
        f"audit checkpoint sink of kind {shown!r} is unknown (file:PATH, syslog, syslog:PATH, syslog://HOST:PORT, "
        "http(s)://URL)",
        code="bad_setting",
    )
