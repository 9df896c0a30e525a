"""A small synchronous client of QEMU's machine protocol (QMP) over a unix socket.

QMP speaks one JSON object per line: a greeting ``{"QMP": {...}}``, then for each command the
client sends (``{"execute": ..., "arguments": ..., "id": N}``) one reply ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}`` with the same ``id``, and asynchronous events
``{"event": ..., "data": ..., "timestamp": ...}`` at any point in between. Events read while
waiting for a reply are kept (a bounded queue) for :meth:`QmpClient.wait_event`.

Every wait has a deadline; a line is at most :data:`MAX_LINE` bytes. Whatever QEMU sends that
does not follow the protocol (not JSON, not an object, a wrong greeting, an oversized line, end
of stream, a reply to another command) raises :class:`QmpError` with ``code = "qmp_protocol"``;
the message names what was wrong, never the bytes received. A command QEMU refuses raises
:class:`QmpCommandError` (a :class:`QmpError`) carrying QEMU's error class and description.
"""

from __future__ import annotations

import collections
import json
import socket
import time
from pathlib import Path
from typing import Any, Final

from keysteward.errors import KeystewardError

MAX_LINE: Final = 1024 * 1024
MAX_EVENTS: Final = 1000
DEFAULT_TIMEOUT: Final = 10.0
_DESC_CHARS: Final = 300


class QmpError(KeystewardError):
    """QEMU's monitor said something that is not QMP, or nothing in time."""

    code = "qmp_protocol"
    status = 502
    title = "QEMU monitor protocol error"


class QmpCommandError(QmpError):
    """QEMU refused a command; ``error_class`` and ``desc`` are QEMU's words."""

    code = "qmp_command_failed"

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc[:_DESC_CHARS]
        super().__init__(f"QEMU refused {command}: {error_class}: {self.desc}")


class QmpClient:
    """One QMP session; not thread-safe. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self.greeting: dict[str, Any] = {}
        self._buffer = bytearray()
        self._next_id = 1
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
            deadline = time.monotonic() + timeout
            greeting = self._read_message(deadline)
            qmp = greeting.get("QMP")
            if not isinstance(qmp, dict) or not isinstance(qmp.get("version"), dict):
                raise QmpError("QMP greeting missing or malformed")
            self.greeting = qmp
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise QmpError(f"cannot talk to the QEMU monitor: {exc.strerror or type(exc).__name__}") from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run ``command``; its ``return`` value (a dict for most commands)."""
        return self._send({"execute": command, **({"arguments": arguments} if arguments else {})}, None, timeout)

    def send_fd(self, fd: int, name: str, *, timeout: float | None = None) -> None:
        """Hand ``fd`` to QEMU (SCM_RIGHTS) under ``name`` with ``getfd``; QEMU gets its own copy."""
        self._send({"execute": "getfd", "arguments": {"fdname": name}}, fd, timeout)

    def wait_event(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """The first kept or next event called ``name`` (removed from the kept ones)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for event in self.events:
                if event.get("event") == name:
                    self.events.remove(event)
                    return event
            message = self._read_message(deadline)
            if "event" not in message:
                raise QmpError("QEMU sent a reply while no command was waiting")
            self.events.append(message)

    # -- wire ------------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any], fd: int | None, timeout: float | None) -> Any:
        command = str(message["execute"])
        message_id = self._next_id
        self._next_id += 1
        data = json.dumps({**message, "id": message_id}).encode() + b"\n"
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            if fd is None:
                self._sock.sendall(data)
            elif socket.send_fds(self._sock, [data], [fd]) != len(data):
                raise QmpError("short write to the QEMU monitor")
        except OSError as exc:
            raise QmpError(f"cannot send {command} to the QEMU monitor: {type(exc).__name__}") from None
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != message_id:
                raise QmpError(f"QEMU's reply to {command} carries another command's id")
            if "return" in reply:
                return reply["return"]
            error = reply.get("error")
            if isinstance(error, dict):
                raise QmpCommandError(command, str(error.get("class", "?")), str(error.get("desc", "")))
            raise QmpError(f"QEMU's reply to {command} has neither return nor error")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        line = self._read_line(deadline)
        try:
            message = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise QmpError(f"QEMU monitor sent a line that is not JSON ({len(line)} bytes)") from None
        if not isinstance(message, dict):
            raise QmpError("QEMU monitor sent JSON that is not an object")
        return message

    def _read_line(self, deadline: float) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                if end > MAX_LINE:
                    raise QmpError(f"QEMU monitor sent a line over {MAX_LINE} bytes")
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if line.strip():
                    return line
                continue
            if len(self._buffer) > MAX_LINE:
                raise QmpError(f"QEMU monitor sent a line over {MAX_LINE} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QEMU monitor did not answer in time")
            try:
                self._sock.settimeout(left)
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError("QEMU monitor did not answer in time") from None
            except OSError as exc:
                raise QmpError(f"QEMU monitor connection failed: {type(exc).__name__}") from None
            if not chunk:
                raise QmpError("QEMU monitor closed the connection mid-message")
            self._buffer += chunk
