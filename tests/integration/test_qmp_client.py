"""The QMP client against a fake QEMU monitor on a real unix socket: what it does with what QEMU sends.

Each fake server plays a script of lines; a malformed or missing reply must raise QmpError with
code ``qmp_protocol`` within the client's timeout, and its message must not echo the bytes received.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keysteward.host.qmp import MAX_LINE, QmpClient, QmpCommandError, QmpError

pytestmark = pytest.mark.integration

GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\n'
SECRET = b"4b53-not-for-logs-4b53"
Script = Callable[[socket.socket], None]


def _ok(conn: socket.socket, reply: dict[str, object] | None = None) -> dict[str, object]:
    """Read one command and answer it with ``reply`` (default: an empty return with its id)."""
    data = b""
    while not data.endswith(b"\n"):
        data += conn.recv(4096)
    command = json.loads(data)
    conn.sendall(json.dumps(reply if reply is not None else {"return": {}, "id": command["id"]}).encode() + b"\n")
    return dict(command)


@pytest.fixture
def fake_qmp(tmp_path: Path) -> Iterator[Callable[[Script], Path]]:
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []

    def start(script: Script) -> Path:
        path = tmp_path / f"qmp{len(servers)}.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                try:
                    script(conn)
                    time.sleep(3)  # hold the connection open: the client must give up on its own
                except OSError:
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for server in servers:
        server.close()


def _greeted(then: Script) -> Script:
    def script(conn: socket.socket) -> None:
        conn.sendall(GREETING)
        _ok(conn)  # qmp_capabilities
        then(conn)

    return script


def _reply_with(raw: bytes) -> Script:
    def script(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(raw)

    return _greeted(script)


def _eof_mid_reply(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.sendall(b'{"return": {"status": "run')
    conn.shutdown(socket.SHUT_RDWR)


GREETING_CASES: dict[str, Script] = {
    "not JSON": lambda c: c.sendall(b"\x00\xffgarbage " + SECRET + b"\n"),
    "not an object": lambda c: c.sendall(b'["' + SECRET + b'"]\n'),
    "wrong greeting": lambda c: c.sendall(b'{"hello": "' + SECRET + b'"}\n'),
    "greeting without version": lambda c: c.sendall(b'{"QMP": {"version": "7"}}\n'),
    "oversized line": lambda c: c.sendall(b'{"QMP": "' + SECRET * (MAX_LINE // len(SECRET) + 2)),
    "silence": lambda c: None,
    "eof": lambda c: c.shutdown(socket.SHUT_RDWR),
    "capabilities refused": lambda c: (c.sendall(GREETING), _ok(c, {"error": {"class": "X", "desc": "d"}, "id": 1})),
}


@pytest.mark.parametrize("case", sorted(GREETING_CASES))
def test_bad_greeting_raises_qmp_protocol(case: str, fake_qmp: Callable[[Script], Path]) -> None:
    path = fake_qmp(GREETING_CASES[case])
    began = time.monotonic()
    with pytest.raises(QmpError) as raised:
        QmpClient(path, timeout=1.0)
    assert time.monotonic() - began < 2.5
    assert raised.value.code == ("qmp_command_failed" if case == "capabilities refused" else "qmp_protocol")
    assert SECRET.decode() not in str(raised.value) and "\\x" not in str(raised.value)


REPLY_CASES: dict[str, Script] = {
    "not JSON": _reply_with(b"{not json " + SECRET + b"\n"),
    "not an object": _reply_with(b"42\n"),
    "oversized line": _reply_with(b'{"return": "' + SECRET * (MAX_LINE // len(SECRET) + 2) + b'"}\n'),
    "eof mid-reply": _greeted(_eof_mid_reply),
    "id mismatch": _reply_with(b'{"return": {}, "id": 99}\n'),
    "neither return nor error": _reply_with(b'{"id": 2, "' + SECRET + b'": 1}\n'),
    "silence": _greeted(lambda c: None),
}


@pytest.mark.parametrize("case", sorted(REPLY_CASES))
def test_bad_reply_raises_qmp_protocol(case: str, fake_qmp: Callable[[Script], Path]) -> None:
    with QmpClient(fake_qmp(REPLY_CASES[case]), timeout=1.0) as client:
        began = time.monotonic()
        with pytest.raises(QmpError) as raised:
            client.execute("query-status")
        assert time.monotonic() - began < 2.5
    assert type(raised.value) is QmpError and raised.value.code == "qmp_protocol"
    assert SECRET.decode() not in str(raised.value)


def test_replies_events_errors_and_fds(fake_qmp: Callable[[Script], Path]) -> None:
    received: list[bytes] = []

    def script(conn: socket.socket) -> None:
        command = _ok(conn, None)
        conn.sendall(b'{"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}\n')
        _ok(conn, {"return": {"status": "running", "running": True}, "id": 2})
        _ok(conn, {"error": {"class": "GenericError", "desc": "no such thing"}, "id": 3})
        msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        received.append(os.read(fds[0], 100))
        os.close(fds[0])
        conn.sendall(b'{"return": {}, "id": 4}\n{"event": "STOP", "timestamp": {}}\n')
        assert command["execute"] == "qmp_capabilities" and json.loads(msg)["arguments"] == {"fdname": "state"}

    with QmpClient(fake_qmp(_greeted_raw(script)), timeout=2.0) as client:
        assert client.greeting["version"]["qemu"]["major"] == 7
        assert client.execute("query-status") == {"status": "running", "running": True}
        with pytest.raises(QmpCommandError) as raised:
            client.execute("bogus", {"x": 1})
        assert raised.value.error_class == "GenericError" and raised.value.desc == "no such thing"
        read_end, write_end = os.pipe()
        os.write(write_end, b"through SCM_RIGHTS")
        client.send_fd(read_end, "state")
        os.close(read_end)
        os.close(write_end)
        assert client.wait_event("STOP", 2.0)["event"] == "STOP"
        assert client.wait_event("RESUME", 0.1)["event"] == "RESUME"  # kept from before
        with pytest.raises(QmpError):
            client.wait_event("SHUTDOWN", 0.2)
    assert received == [b"through SCM_RIGHTS"]


def _greeted_raw(then: Script) -> Script:
    def script(conn: socket.socket) -> None:
        conn.sendall(GREETING)
        then(conn)

    return script
