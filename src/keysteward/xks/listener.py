"""The XKS listener: its own HTTPS port (``[xks] listen`` / ``KEYSTEWARD_XKS_LISTEN=HOST:PORT``).

It runs beside the REST listener in the same process, on its own thread and (uvloop) event loop, behind the same
connection, head and body limits (:mod:`keysteward.netlimits`) and the same TLS settings (TLS 1.2+,
AEAD forward-secret suites); the caller builds the TLS context and the protocol class.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, cast

import uvicorn

from keysteward.errors import BadRequest
from keysteward.netlimits import Limits, uvicorn_protocol

log = logging.getLogger("keysteward.xks")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop, as the REST and KMIP listeners have: its C transports and TLS layer cost about half of
    the CPU of asyncio's pure-Python ones per XKS call."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


class XksListener:
    def __init__(self, app: Any, sock: socket.socket, ctx: ssl.SSLContext, limits: Limits, protocol: type[Any]) -> None:
        """``sock`` is bound and listening (each server worker binds its own with SO_REUSEPORT)."""
        self.sock = sock
        http = uvicorn_protocol(protocol, limits, tls=ctx)
        config = uvicorn.Config(
            app,
            http=cast(Any, http),
            log_level="warning",
            access_log=False,
            timeout_keep_alive=30,
            lifespan="off",
            proxy_headers=False,  # the audited, policy-checked source is the TCP peer, never X-Forwarded-For
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="xks-listener", daemon=True)
        self.failed: BaseException | None = None

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # noqa: BLE001 - reported by start() and in the log
            self.failed = exc
            log.error("the XKS listener stopped: %s", type(exc).__name__)

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        for _ in range(int(timeout * 20)):
            if self.server.started or not self.thread.is_alive():
                break
            self.thread.join(0.05)
        if not self.server.started:
            why = type(self.failed).__name__ if self.failed else "timeout"
            raise BadRequest(f"the XKS listener did not start ({why})", code="xks_listen_failed")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5.0)
