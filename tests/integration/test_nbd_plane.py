"""The native data plane (keysteward/proxy/plane.py and nbd_plane.c) against the Python transmission phase.

The same requests, good and bad, go to two servers over two copies of one volume, one serving plaintext
connections natively and one in Python: every reply must be the same bytes and the two volume files must
end the same (the same ciphertext: same key, same tweaks). Then what only the native loop can get wrong:
that it really serves (its thread runs, its counters reach the metrics), that a revocation in the middle
of a stream of writes ends the connection and wipes the key, that garbage headers get the Python path's
answers while another client goes on, and that a graceful stop answers the requests in flight.

Each runs in plaintext and over TLS, where the loop reads and writes through the session Python's ssl
module negotiated (keysteward/proxy/tls_lend.py, nbd_tls.c); and over TLS, records that do not
authenticate end only their own connection.
"""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keysteward.crypto.xts import native_available
from keysteward.formats import nbd
from keysteward.proxy import tls_lend
from keysteward.proxy.export import LuksExport
from keysteward.proxy.metrics import ProxyMetrics
from keysteward.volume import LuksVolume
from tests.support.nbd import (
    MIB,
    PASSPHRASE,
    Pki,
    RawClient,
    ServerThread,
    client_context,
    make_pki,
    make_volume,
    server_context,
)

pytestmark = pytest.mark.integration

SIZE = 4 * MIB
MODES = ["plaintext", "tls", "tls-asyncio"]
"""``tls-asyncio``: TLS on asyncio's own event loop and TLS transport, as ``keysteward proxy serve`` runs them
(``keysteward host`` and the other tests run uvloop's)."""


def test_the_native_extension_is_built() -> None:
    assert native_available(), "keysteward.crypto._xts_native is not built: the native NBD plane cannot run"


def test_tls_sessions_can_be_lent_here() -> None:
    ssl.create_default_context()  # the ssl module (and with it libssl) is loaded in every server
    assert tls_lend.available(), "TLS connections would stay on the Python path: see keysteward.proxy.tls_lend"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Mode:
    """Plaintext or TLS: the server's context and a client's."""

    def __init__(self, name: str, pki: Pki) -> None:
        self.tls = name.startswith("tls")
        self.uvloop = name != "tls-asyncio"
        self.pki = pki

    def server(self, exports: dict[str, LuksExport]) -> ServerThread:
        return ServerThread(exports, tls=server_context(self.pki) if self.tls else None, uvloop=self.uvloop)

    def client(self, port: int, *, structured: bool = True) -> RawClient:
        client = RawClient.connect(port)
        client.open("vol", structured=structured, tls=client_context(self.pki) if self.tls else None)
        return client


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, pki: Pki) -> Mode:
    return Mode(request.param, pki)


@pytest.fixture
def twins(tmp_path: Path, mode: Mode) -> Iterator[tuple[ServerThread, ServerThread, Path, Path]]:
    """Two servers over byte-identical copies of one volume: native first, Python second."""
    image = make_volume(tmp_path / "a.img", SIZE)
    copy = tmp_path / "b.img"
    shutil.copyfile(image, copy)
    native = mode.server({"vol": LuksExport.open("vol", str(image), PASSPHRASE)})
    python = mode.server({"vol": LuksExport.open("vol", str(copy), PASSPHRASE)})
    python.server.native = False
    with native, python:
        yield native, python, image, copy


def _raw_replies(mode: Mode, port: int, structured: bool, requests: list[bytes], expect: list[int]) -> bytes:
    """Send each request and read exactly ``expect[i]`` reply bytes for it (or to EOF when -1)."""
    client = mode.client(port, structured=structured)
    out = bytearray()
    for request, n in zip(requests, expect, strict=True):
        client.send(request)
        if n < 0:
            client.sock.settimeout(5)
            out += b"EOF" if client.closed_by_server() else b"OPEN"
            break
        out += client.recv_exactly(n)
    client.close()
    return bytes(out)


def _req(command: int, offset: int, length: int, flags: int = 0, handle: int = 7) -> bytes:
    return nbd.encode_request(command, handle, offset, length, flags)


def _script(structured: bool) -> tuple[list[bytes], list[int]]:
    """Requests (with payloads) and the size of each one's reply: the fast path and every hand-off."""
    rng = random.Random(5)
    data = rng.randbytes(256 * 1024)
    simple, err_chunk = 16, 20 + 6 + len(b"read failed")
    read_ok = (lambda n: 20 + 8 + n) if structured else (lambda n: 16 + n)
    read_err = err_chunk if structured else simple
    steps: list[tuple[bytes, int]] = [
        (_req(nbd.CMD_WRITE, 0, len(data)) + data, simple),  # native write
        (_req(nbd.CMD_READ, 0, len(data)), read_ok(len(data))),  # native read
        (_req(nbd.CMD_WRITE, 8192, 4096, nbd.CMD_FLAG_FUA) + data[:4096], simple),  # FUA
        (_req(nbd.CMD_FLUSH, 0, 0), simple),
        (_req(nbd.CMD_READ, 100, 1000), read_ok(1000)),  # partial sectors: handed off
        (_req(nbd.CMD_WRITE, 1000, 3000) + data[:3000], simple),
        (_req(nbd.CMD_READ, 0, 8192), read_ok(8192)),
        (_req(nbd.CMD_TRIM, 0, 4096), simple),
        (_req(nbd.CMD_WRITE_ZEROES, 4096, 8192), simple),
        (_req(nbd.CMD_READ, 0, 16384), read_ok(16384)),
        (_req(nbd.CMD_READ, SIZE - 4096, 8192), read_err),  # past the end: EINVAL
        (_req(nbd.CMD_WRITE, SIZE - 512, 1024) + data[:1024], simple),  # ENOSPC
        (_req(nbd.CMD_READ, 0, 0), read_err),  # length 0: EINVAL
        (_req(nbd.CMD_READ, 0, 4096, 1 << 9), read_err),  # an unknown flag
        (_req(77, 0, 0), simple),  # an unknown command
        (_req(nbd.CMD_READ, 0, 33 * MIB), read_err),  # over the maximum block
        (_req(nbd.CMD_READ, 512, 512), read_ok(512)),  # inside a 4 KiB sector: handed off
        (_req(nbd.CMD_READ, 4096, 4096, nbd.CMD_FLAG_DF | nbd.CMD_FLAG_FUA), read_ok(4096)),
        (b"\x00" * 28, -1),  # bad magic: the connection is dropped
    ]
    return [s[0] for s in steps], [s[1] for s in steps]


@pytest.mark.parametrize("structured", [True, False])
def test_every_reply_and_every_byte_on_disk_match_the_python_path(
    twins: tuple[ServerThread, ServerThread, Path, Path], mode: Mode, structured: bool
) -> None:
    native, python, image, copy = twins
    counted: list[tuple[str, int]] = []
    native.server.on_requests = lambda _export, command, n, *_rest: counted.append((command, n))
    requests, expect = _script(structured)
    got = _raw_replies(mode, native.port, structured, requests, expect)
    want = _raw_replies(mode, python.port, structured, requests, expect)
    assert got.endswith(b"EOF") and want.endswith(b"EOF")
    assert got == want
    deadline = time.monotonic() + 10
    served = lambda: sum(n for command, n in counted if command in ("read", "write"))  # noqa: E731
    while served() < 6 and time.monotonic() < deadline:
        time.sleep(0.02)  # the loop's counters arrive when its connection ends
    assert served() == 6, counted  # the native loop served the 4 reads and 2 writes of whole 4 KiB sectors
    native.call(lambda: _flush(native))
    python.call(lambda: _flush(python))
    assert image.read_bytes() == copy.read_bytes()


async def _flush(server: ServerThread) -> None:
    for export in server.server.exports.values():
        export.flush()


def test_the_native_loop_serves_and_counts_into_the_metrics(tmp_path: Path, mode: Mode) -> None:
    metrics = ProxyMetrics()
    export = LuksExport.open("vol", str(make_volume(tmp_path / "v.img", SIZE)), PASSPHRASE)
    with mode.server({"vol": export}) as server:
        server.server.on_request = metrics.observe
        server.server.on_requests = metrics.observe_many
        client = mode.client(server.port)
        deadline = time.monotonic() + 10  # the server hands the session over just after the client's handshake
        while not any(t.name == "ks-nbd-plane" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(t.name == "ks-nbd-plane" for t in threading.enumerate())
        for i in range(20):
            client.write(i * 4096, bytes([i]) * 4096)
        for i in range(20):
            assert client.read(i * 4096, 4096) == bytes([i]) * 4096
        client.read(10, 10)  # handed off: counted per request by on_request
        client.disconnect()
        deadline = time.monotonic() + 10
        while any(t.name == "ks-nbd-plane" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.02)
    text = metrics.render().decode()
    assert 'keysteward_proxy_requests_total{command="write",export="vol"} 20.0' in text
    assert 'keysteward_proxy_requests_total{command="read",export="vol"} 21.0' in text
    assert 'keysteward_proxy_written_bytes_total{export="vol"} 81920.0' in text
    assert 'keysteward_proxy_read_bytes_total{export="vol"} 81930.0' in text
    assert 'keysteward_proxy_request_seconds_count{command="write",export="vol"} 20.0' in text


def test_revocation_in_a_stream_of_writes_ends_the_connection_and_wipes_the_key(tmp_path: Path, mode: Mode) -> None:
    export = LuksExport.open("vol", str(make_volume(tmp_path / "v.img", SIZE)), PASSPHRASE)
    with mode.server({"vol": export}) as server:
        client = mode.client(server.port)
        stop, replies, failure = threading.Event(), [0], []

        def stream() -> None:
            payload = b"w" * 65536
            try:
                while not stop.is_set():
                    client.write((replies[0] % 32) * 65536, payload)
                    replies[0] += 1
            except Exception as exc:  # the server dropped the connection: what must happen
                failure.append(exc)

        writer = threading.Thread(target=stream)
        writer.start()
        while replies[0] < 20:
            time.sleep(0.01)
        started = time.monotonic()
        server.call(lambda: server.server.close_export("vol", "revoked"))
        writer.join(10)
        stop.set()
        assert not writer.is_alive() and failure, "the writer was still served after the revocation"
        assert time.monotonic() - started < 5
        assert export.closed and export.volume._key is None
        assert not any(t.name == "ks-nbd-plane" for t in threading.enumerate())


def test_fuzzed_headers_get_the_python_answers_and_a_bystander_goes_on(tmp_path: Path, mode: Mode) -> None:
    image = make_volume(tmp_path / "v.img", SIZE)
    export = LuksExport.open("vol", str(image), PASSPHRASE)
    rng = random.Random(11)
    with mode.server({"vol": export}) as server:
        bystander = mode.client(server.port)
        bystander.write(0, b"b" * 4096)
        before = image.read_bytes()
        for _ in range(40 if not mode.tls else 20):
            client = mode.client(server.port, structured=rng.random() < 0.5)
            client.sock.settimeout(5)
            command = rng.choice([nbd.CMD_READ, nbd.CMD_FLUSH, nbd.CMD_TRIM, 9, 200, 65535])
            flags = rng.choice([0, 0, 1 << rng.randrange(16)])
            header = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, 1, rng.randrange(1 << 64),
                                 rng.randrange(1 << 32))  # fmt: skip
            if rng.random() < 0.2:
                header = rng.randbytes(28)
            client.send(header)
            try:
                magic = struct.unpack(">I", client.recv_exactly(4))[0]
                assert magic in (nbd.SIMPLE_REPLY_MAGIC, nbd.STRUCTURED_REPLY_MAGIC)
            except (ConnectionError, TimeoutError):
                pass  # dropped: bad magic, or a read so large its reply is not worth waiting for
            client.close()
            assert bystander.read(0, 4096) == b"b" * 4096
        assert image.read_bytes() == before  # nothing but reads and refusals: nothing on disk changed
        bystander.disconnect()


def test_a_graceful_stop_answers_the_requests_in_flight(tmp_path: Path, mode: Mode) -> None:
    """Requests the client sent before the stop are answered, those the server already reads and those
    still waiting in its socket; closing with one unread would reset the connection and lose every reply."""
    export = LuksExport.open("vol", str(make_volume(tmp_path / "v.img", SIZE)), PASSPHRASE)
    server = mode.server({"vol": export})
    payloads = [bytes([0x61 + i]) * (MIB // 2) for i in range(6)]
    with server:
        client = mode.client(server.port)
        client.write(0, b"s" * MIB)
        handles = [client.request(nbd.CMD_WRITE, i * MIB // 2, MIB // 2, payload=p) for i, p in enumerate(payloads)]
    replies = [client.reply()[:2] for _ in handles]  # the server stopped gracefully: every write was answered
    assert replies == [(handle, 0) for handle in handles]
    with LuksVolume.open(str(tmp_path / "v.img"), PASSPHRASE) as volume:
        assert volume.read(0, 3 * MIB) == b"".join(payloads)


@pytest.mark.parametrize("name", ["tls", "tls-asyncio"])
def test_tls_records_that_do_not_authenticate_end_only_their_connection(tmp_path: Path, pki: Pki, name: str) -> None:
    """The attacker on the path flips bits in a write's records, or injects records of his own: the session
    refuses them, that connection ends, nothing reaches the disk, and the other client is served on."""
    mode = Mode(name, pki)
    image = make_volume(tmp_path / "v.img", SIZE)
    export = LuksExport.open("vol", str(image), PASSPHRASE)
    rng = random.Random(3)
    with mode.server({"vol": export}) as server:
        bystander = mode.client(server.port)
        bystander.write(0, b"b" * 65536)
        before = image.read_bytes()
        for attempt in range(6):
            client = mode.client(server.port)
            assert isinstance(client.sock, ssl.SSLSocket)
            raw = socket.socket(fileno=client.sock.detach())  # the TCP stream under the session
            raw.settimeout(5)
            if attempt % 2:  # a record of the right shape whose ciphertext is noise
                body = rng.randbytes(4096)
                record = b"\x17\x03\x03" + struct.pack(">H", len(body)) + body
            else:  # whatever the attacker likes, framing included
                record = rng.randbytes(rng.randrange(1, 20000))
            raw.sendall(record)
            if not attempt % 2:
                raw.shutdown(socket.SHUT_WR)  # a header may promise more than was sent: the rest never comes
            try:
                while raw.recv(65536):  # at most an alert, then the end
                    pass
                ended = True
            except ConnectionError:
                ended = True
            except TimeoutError:
                ended = False
            raw.close()
            assert ended, "the server kept a connection open after a record that does not authenticate"
            assert bystander.read(0, 65536) == b"b" * 65536
        assert image.read_bytes() == before
        bystander.write(65536, b"c" * 4096)
        assert bystander.read(65536, 4096) == b"c" * 4096
        bystander.disconnect()


def test_requests_sent_behind_the_handshake_are_served_natively(tmp_path: Path, mode: Mode) -> None:
    """A client that does not wait for the GO reply (its first requests arrive with it) is still handed
    to the native loop, which reads the requests Python had received first, in order."""
    export = LuksExport.open("vol", str(make_volume(tmp_path / "v.img", SIZE)), PASSPHRASE)
    counted: list[tuple[str, int]] = []
    with mode.server({"vol": export}) as server:
        server.server.on_requests = lambda _export, command, n, *_rest: counted.append((command, n))
        client = RawClient.connect(server.port)
        client.greet()
        if mode.tls:
            client.starttls(client_context(mode.pki))
        payloads = [bytes([i]) * 8192 for i in range(1, 9)]
        burst = nbd.encode_option(nbd.OPT_GO, nbd.encode_info_request("vol", (nbd.INFO_BLOCK_SIZE,)))
        for i, data in enumerate(payloads):
            burst += _req(nbd.CMD_WRITE, i * 8192, len(data), handle=i) + data
        burst += b"".join(_req(nbd.CMD_READ, i * 8192, 8192, handle=100 + i) for i in range(len(payloads)))
        client.send(burst)
        while client.option_reply().reply != nbd.REP_ACK:
            pass
        for i in range(len(payloads)):
            assert client.reply() == (i, 0, b"")
        for i, data in enumerate(payloads):
            assert client._simple_read_reply(len(data)) == (100 + i, 0, data)
        client.disconnect()
        deadline = time.monotonic() + 10
        while sum(n for _, n in counted) < 16 and time.monotonic() < deadline:
            time.sleep(0.02)
    served = {command: sum(n for c, n in counted if c == command) for command in ("read", "write")}
    assert served == {"read": 8, "write": 8}, counted  # all 16 by the native loop (it alone reports in batches)
