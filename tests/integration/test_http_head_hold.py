"""keysteward.http_head_hold under a real uvicorn server (uvloop, the listeners' protocol from
keysteward.netlimits) and a client on a real socket: an answer's head and body leave in one send, and no
answer is cut, reordered or held (a head without a body, a streamed body, a close, kept-alive requests)."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, cast

import pytest
import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from keysteward.netlimits import Limits, uvicorn_protocol

pytestmark = pytest.mark.integration

BODY = b'{"ciphertext": "' + b"A" * 5000 + b'"}'


async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    path = scope["path"]
    if path == "/empty":  # a 204: a head and nothing after it
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/stream":  # no content-length: chunked, three body writes
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    if path == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(app, http=cast(Any, uvicorn_protocol(HttpToolsProtocol, Limits())), log_level="warning",
                            access_log=False, lifespan="off")  # fmt: skip
    running = uvicorn.Server(config)

    def run() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(running.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    running.should_exit = True
    thread.join(5)


def _request(conn: socket.socket, method: str, path: str) -> None:
    conn.sendall(f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".encode())


def _read_until(conn: socket.socket, end: bytes, *, size: int | None = None) -> bytes:
    data = b""
    while not (data.endswith(end) if size is None else len(data) >= size):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _writes() -> int:
    """This process's write system calls so far: the server's sends (libuv writes to a TCP socket with
    ``write``/``writev``); the client here uses ``send``, which the count leaves out."""
    return int(re.search(rb"syscw: (\d+)", Path("/proc/self/io").read_bytes()).group(1))  # type: ignore[union-attr]


def test_head_and_body_leave_in_one_send_on_a_kept_alive_connection(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        _request(conn, "POST", "/answer")
        assert _read_until(conn, BODY).startswith(b"HTTP/1.1 200 ")
        before = _writes()
        for _ in range(40):
            _request(conn, "POST", "/answer")
            answer = _read_until(conn, BODY)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1
        sends = _writes() - before
    assert 40 <= sends < 50, sends  # one per answer (two, head then body, without the hold)


def test_a_head_without_a_body_and_a_head_request_are_not_held(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        _request(conn, "POST", "/empty")
        assert _read_until(conn, b"\r\n\r\n").startswith(b"HTTP/1.1 204 ")
        _request(conn, "HEAD", "/answer")  # a head only (uvicorn writes no body), then the next answer
        head = _read_until(conn, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and f"content-length: {len(BODY)}".encode() in head
        _request(conn, "POST", "/answer")
        assert _read_until(conn, BODY).startswith(b"HTTP/1.1 200 ")


def test_a_streamed_answer_and_a_closing_one_arrive_whole_and_in_order(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=5) as conn:
        _request(conn, "POST", "/stream")
        answer = _read_until(conn, b"0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in answer
        assert answer.split(b"\r\n\r\n", 1)[1] == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"
        _request(conn, "POST", "/close")
        answer = _read_until(conn, b"never")  # the server sends the answer and closes
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(BODY)
        assert conn.recv(1) == b""
