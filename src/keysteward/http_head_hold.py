"""One send per HTTP answer: a response head is held until its body is written, then both leave together.

uvicorn writes a response's head and its body with two ``transport.write`` calls. Over TLS each is a TLS
record and a ``send``; on loopback a ``send`` also carries the receiver's side of TCP, so the head alone
cost about a tenth of an XKS call's server CPU (py-spy, ``bench/xks.py``). :class:`HeadHold` wraps the
transport an HTTP protocol writes to: a write that is a whole response head (``HTTP/1.1 ...`` up to its
blank line) is held, and the next write, normally the body in the same turn of the loop, is sent joined
to it. A head with no body after it (a ``HEAD`` answer, a ``204``) leaves at the end of the turn
(``call_soon``), and a ``close`` sends what is held first: nothing is reordered, dropped or delayed past
the current turn. Everything else is the wrapped transport's.
"""

from __future__ import annotations

import asyncio
from typing import Any

_HEAD_START, _HEAD_END = b"HTTP/1.", b"\r\n\r\n"


class HeadHold:
    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
        elif isinstance(data, bytes) and data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._transport, name)
