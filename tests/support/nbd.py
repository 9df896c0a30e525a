"""Helpers for the NBD proxy's tests and bench: volumes, a tenant PKI, the server on a thread or in a
process, and a raw NBD client that can send what real clients never would.

Nothing here imports pytest: ``bench/nbd.py`` uses the same helpers. ``python -m tests.support.nbd serve``
runs a server process (the fault test SIGKILLs it; the bench measures it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keysteward.crypto import x509ca
from keysteward.formats import nbd
from keysteward.proxy.export import Export, LuksExport
from keysteward.proxy.server import NbdServer
from keysteward.volume import CreateOptions, KdfChoice, create_volume

MIB = 1024 * 1024
PASSPHRASE = b"nbd test passphrase"
FAST_KDF = KdfChoice(type="pbkdf2", iterations=1000)


def make_volume(
    path: Path, size: int, *, sector: int = 4096, luks1: bool = False, passphrase: bytes = PASSPHRASE
) -> Path:
    """A new LUKS2 (or LUKS1) volume file whose payload is ``size`` bytes, with a fast PBKDF2 keyslot."""
    options = CreateOptions(size=size, sector_size=512 if luks1 else sector, kdf=FAST_KDF, luks1=luks1)
    create_volume(str(path), passphrase, options)
    return path


# -- PKI ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A tenant CA, the proxy's server certificate, and a client certificate directory in the layout
    both QEMU (``tls-creds-x509,dir=``) and libnbd (``tls-certificates=``) read."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_dir: Path

    @property
    def client_cert(self) -> Path:
        return self.client_dir / "client-cert.pem"

    @property
    def client_key(self) -> Path:
        return self.client_dir / "client-key.pem"


def _write_private(path: Path, data: bytes | bytearray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


DEFAULT_CLIENT = "host-1"


def make_pki(root: Path, *, tenant: str = "acme", client: str = DEFAULT_CLIENT) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key = x509ca.new_ca(f"{tenant} tenant CA")
    server = x509ca.issue_server_cert(ca_pem, ca_key, hostnames=["localhost"], ips=["127.0.0.1"])
    issued = x509ca.issue_client_cert(ca_pem, ca_key, tenant=tenant, role="host", name=client)
    assert server.key_pem is not None and issued.key_pem is not None
    (root / "ca.pem").write_text(ca_pem)
    (root / "server-cert.pem").write_text(server.cert_pem)
    _write_private(root / "server-key.pem", server.key_pem)
    client_dir = root / "client"
    client_dir.mkdir(exist_ok=True)
    (client_dir / "ca-cert.pem").write_text(ca_pem)
    (client_dir / "client-cert.pem").write_text(issued.cert_pem)
    _write_private(client_dir / "client-key.pem", issued.key_pem)
    return Pki(root / "ca.pem", root / "server-cert.pem", root / "server-key.pem", client_dir)


def server_context(pki: Pki) -> ssl.SSLContext:
    """The proxy's context: its certificate, and client certificates required from the tenant CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(pki.ca_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(pki: Pki, *, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if with_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


# -- the server on a thread --------------------------------------------------------------------------


class ServerThread:
    """An :class:`NbdServer` on an event loop of its own thread, listening on 127.0.0.1: uvloop's, or with
    ``uvloop=False`` asyncio's own (the one ``keysteward proxy serve`` runs on)."""

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        tls: ssl.SSLContext | None = None,
        default_export: str | None = None,
        unix_path: str | None = None,
        clients: Mapping[str, Collection[str]] | None = None,
        uvloop: bool = True,
    ) -> None:
        """With ``tls``, ``clients`` (export -> certificate names) says who may open what; by default every
        export names the client certificate of :func:`make_pki` (``host-1``) and nothing else."""
        policy = dict(clients) if clients is not None else {name: (DEFAULT_CLIENT,) for name in exports}
        self.clients = policy
        self.server = NbdServer(exports, tls=tls, allow_plaintext=tls is None, default_export=default_export,
                                clients=lambda name: self.clients.get(name, ()))  # fmt: skip
        self.unix_path = unix_path
        self.uvloop = uvloop
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ServerThread:
        import uvloop

        loop = uvloop.new_event_loop() if self.uvloop else asyncio.new_event_loop()
        self.loop = loop
        started = threading.Event()
        failure: list[BaseException] = []

        async def begin() -> None:
            self.port = await self.server.start("127.0.0.1", 0)
            if self.unix_path is not None:
                await self.server.serve_unix(self.unix_path)

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(begin())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="nbd-server", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        return self

    def call(self, make: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 60) -> Any:
        """Run ``make()`` on the server's loop and return its result."""
        assert self.loop is not None

        async def wrapped() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def set_exports(self, exports: Mapping[str, Export]) -> None:
        async def go() -> None:
            self.server.set_exports(exports)

        self.call(go)

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self._thread is not None
        try:
            self.call(self.server.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"


# -- a raw client ------------------------------------------------------------------------------------


class NbdError(Exception):
    """An error reply (``error`` is the protocol's value)."""

    def __init__(self, error: int, message: str = "") -> None:
        super().__init__(f"NBD error {error} {message}".strip())
        self.error = error


class RawClient:
    """A blocking NBD client that speaks through the codec and lets a test send anything."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket = sock
        self.structured = False
        self._handle = 0
        sock.settimeout(30)

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        return cls(socket.create_connection((host, port), timeout=30))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """True if the server closed the connection (reads EOF or a reset) within the timeout."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    # -- handshake ---------------------------------------------------------------------------------

    def greet(self, client_flags: int = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES) -> int:
        flags = nbd.decode_greeting(self.recv_exactly(nbd.GREETING_SIZE))
        self.send(struct.pack(">I", client_flags))
        return flags

    def option_reply(self) -> nbd.OptionReply:
        option, reply, length = nbd.decode_option_reply_header(self.recv_exactly(nbd.OPTION_REPLY_HEADER_SIZE))
        return nbd.OptionReply(option, reply, self.recv_exactly(length))

    def option(self, option: int, data: bytes = b"") -> list[nbd.OptionReply]:
        """Send an option; the replies up to and including the ACK or the first error."""
        self.send(nbd.encode_option(option, data))
        replies = []
        while True:
            reply = self.option_reply()
            replies.append(reply)
            if reply.reply == nbd.REP_ACK or reply.is_error:
                return replies

    def starttls(self, ctx: ssl.SSLContext, hostname: str = "localhost") -> None:
        (reply,) = self.option(nbd.OPT_STARTTLS)
        assert reply.reply == nbd.REP_ACK, reply
        self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)

    def go(self, name: str, info_types: tuple[int, ...] = (nbd.INFO_BLOCK_SIZE,)) -> dict[int, Any]:
        replies = self.option(nbd.OPT_GO, nbd.encode_info_request(name, info_types))
        if replies[-1].is_error:
            raise NbdError(replies[-1].reply, replies[-1].data.decode(errors="replace"))
        return dict(nbd.decode_info(r.data) for r in replies if r.reply == nbd.REP_INFO)

    def open(self, name: str = "", *, structured: bool = True, tls: ssl.SSLContext | None = None) -> dict[int, Any]:
        self.greet()
        if tls is not None:
            self.starttls(tls)
        if structured:
            assert self.option(nbd.OPT_STRUCTURED_REPLY)[-1].reply == nbd.REP_ACK
            self.structured = True
        return self.go(name)

    # -- transmission ------------------------------------------------------------------------------

    def request(self, command: int, offset: int, length: int, *, flags: int = 0, payload: bytes = b"") -> int:
        self._handle += 1
        self.send(nbd.encode_request(command, self._handle, offset, length, flags) + payload)
        return self._handle

    def reply(self) -> tuple[int, int, bytes]:
        """``(handle, error, data)`` of the next reply (all chunks of a structured one)."""
        magic = self.recv_exactly(4)
        if struct.unpack(">I", magic)[0] == nbd.SIMPLE_REPLY_MAGIC:
            head = nbd.decode_simple_reply(magic + self.recv_exactly(nbd.SIMPLE_REPLY_SIZE - 4))
            return head.handle, head.error, b""
        data, error = bytearray(), 0
        while True:
            head = nbd.decode_structured_header(magic + self.recv_exactly(16), 64 * MIB)
            body = self.recv_exactly(head.length)
            if head.reply_type == nbd.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            elif head.reply_type == nbd.REPLY_TYPE_ERROR:
                error = nbd.decode_structured_error(body)[0]
            if head.flags & nbd.REPLY_FLAG_DONE:
                return head.handle, error, bytes(data)
            magic = self.recv_exactly(4)

    def _simple_read_reply(self, length: int) -> tuple[int, int, bytes]:
        handle, error, _ = self.reply()
        return handle, error, b"" if error else self.recv_exactly(length)

    def call(self, command: int, offset: int, length: int, *, flags: int = 0, payload: bytes = b"") -> bytes:
        """One request and its reply; an error reply raises :class:`NbdError`."""
        handle = self.request(command, offset, length, flags=flags, payload=payload)
        if command == nbd.CMD_READ and not self.structured:
            got, error, data = self._simple_read_reply(length)
        else:
            got, error, data = self.reply()
        assert got == handle, (got, handle)
        if error:
            raise NbdError(error)
        return data

    def read(self, offset: int, length: int) -> bytes:
        return self.call(nbd.CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        self.call(nbd.CMD_WRITE, offset, len(data), flags=nbd.CMD_FLAG_FUA if fua else 0, payload=data)

    def flush(self) -> None:
        self.call(nbd.CMD_FLUSH, 0, 0)

    def disconnect(self) -> None:
        self.request(nbd.CMD_DISC, 0, 0)
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


# -- a server process ----------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    import signal

    passphrase = Path(args.passphrase_file).read_bytes()
    exports: dict[str, Export] = {}
    for spec in args.export:
        name, _, path = spec.partition("=")
        exports[name] = LuksExport.open(name, path, passphrase, read_only=args.read_only)
    tls = server_context(Pki(*(Path(p) for p in args.tls.split(",")))) if args.tls else None
    server = NbdServer(exports, tls=tls, allow_plaintext=tls is None, clients=lambda _name: (DEFAULT_CLIENT,))
    server.native = not args.python_plane
    port = await server.start(args.host, args.port)
    if args.unix:
        await server.serve_unix(args.unix)
    Path(args.port_file + ".tmp").write_text(str(port))
    os.replace(args.port_file + ".tmp", args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.nbd")
    sub = parser.add_subparsers(dest="verb", required=True)
    serve = sub.add_parser("serve", help="serve LUKS volumes over NBD until SIGTERM")
    serve.add_argument("--export", action="append", required=True, help="NAME=PATH (repeatable)")
    serve.add_argument("--passphrase-file", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--unix", default="")
    serve.add_argument("--port-file", required=True, help="written with the bound port once listening")
    serve.add_argument("--tls", default="", help="CA,SERVER_CERT,SERVER_KEY,CLIENT_DIR (make_pki's files)")
    serve.add_argument("--read-only", action="store_true")
    serve.add_argument("--python-plane", action="store_true", help="no native data plane (bench/nbd.py compares)")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
