"""Mutual TLS through a real uvicorn server: the app sees the client certificate and verifies it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keysteward.crypto import x509ca, x509identity
from keysteward.errors import Unauthenticated
from keysteward.server import tls
from keysteward.server.tls import add_client_ca, client_cert_der, server_ssl_context, uvicorn_server

pytestmark = pytest.mark.integration


def _write(path: Path, data: str | bytes | bytearray) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else bytes(data))
    return str(path)


@dataclass
class Tenant:
    name: str
    ca_pem: str
    ca_key: bytearray = field(repr=False)

    def agent(self, name: str, *, tenant: str | None = None) -> x509ca.IssuedCert:
        return x509ca.issue_client_cert(self.ca_pem, self.ca_key, tenant=tenant or self.name, role="agent", name=name)


def _tenant(name: str) -> Tenant:
    ca_pem, ca_key = x509ca.new_ca(f"{name} machines")
    return Tenant(name, ca_pem, ca_key)


def _make_app(tenant_cas: dict[str, str], hits: list[bytes | None]) -> Starlette:
    """Identity of the verified client certificate, or 401 saying why not; ``hits`` logs requests."""

    async def whoami(request: Request) -> JSONResponse:
        der = client_cert_der(request)
        hits.append(der)
        if der is None:
            return JSONResponse({"error": "no client certificate"}, status_code=401)
        try:
            claimed = x509identity.peek_identity(der)
            ca_pem = tenant_cas.get(claimed.tenant)
            if ca_pem is None:
                raise Unauthenticated("unknown tenant", code="bad_client_cert")
            ident = x509identity.verify_client_cert(der, ca_pem)
        except Unauthenticated as exc:
            return JSONResponse({"error": exc.message}, status_code=401)
        return JSONResponse({"tenant": ident.tenant, "role": ident.role, "name": ident.name})

    return Starlette(routes=[Route("/whoami", whoami)])


@dataclass
class Site:
    tmp: Path
    server_ca_file: str
    cert_file: str
    key_file: str


@pytest.fixture
def site(tmp_path: Path) -> Site:
    server_ca, server_ca_key = x509ca.new_ca("keysteward server CA")
    srv = x509ca.issue_server_cert(server_ca, server_ca_key, hostnames=["localhost"], ips=["127.0.0.1"])
    assert srv.key_pem is not None
    return Site(
        tmp=tmp_path,
        server_ca_file=_write(tmp_path / "server-ca.pem", server_ca),
        cert_file=_write(tmp_path / "server.crt", srv.cert_pem),
        key_file=_write(tmp_path / "server.key", srv.key_pem),
    )


@contextlib.contextmanager
def _serving(ctx: ssl.SSLContext, tenant_cas: dict[str, str], hits: list[bytes | None] | None = None) -> Iterator[str]:
    """Run uvicorn in a thread on a pre-bound free port; stop it and check it stopped."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = _make_app(tenant_cas, hits if hits is not None else [])
    server = uvicorn_server(app, "127.0.0.1", port, ctx, log_level="warning", lifespan="off")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        assert server.config.ssl is ctx
        yield f"https://127.0.0.1:{port}/whoami"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not shut down"


def _client(site: Site, cert: x509ca.IssuedCert | None) -> httpx.Client:
    # httpx 0.28 deprecates cert=(certfile, keyfile); a context carrying the chain is the same thing.
    ctx = ssl.create_default_context(cafile=site.server_ca_file)
    if cert is not None:
        assert cert.key_pem is not None
        ctx.load_cert_chain(
            _write(site.tmp / f"{cert.serial}.crt", cert.cert_pem),
            _write(site.tmp / f"{cert.serial}.key", cert.key_pem),
        )
    return httpx.Client(verify=ctx, timeout=10)


def test_agent_cert_gives_identity_and_no_cert_gives_401(site: Site) -> None:
    acme = _tenant("acme")
    tenant_cas = {"acme": acme.ca_pem}
    ctx = server_ssl_context(site.cert_file, site.key_file, [acme.ca_pem])
    with _serving(ctx, tenant_cas) as url:
        with _client(site, acme.agent("vm-1")) as client:
            for _ in range(2):  # both requests of a kept-alive connection carry the certificate
                r = client.get(url)
                assert r.status_code == 200, r.text
                assert r.json() == {"tenant": "acme", "role": "agent", "name": "vm-1"}
        with _client(site, None) as client:  # a person: TLS works, the app says who is missing
            r = client.get(url)
            assert r.status_code == 401
            assert r.json() == {"error": "no client certificate"}


def _raw_tls12_handshake(site: Site, url: str, cert: x509ca.IssuedCert) -> None:
    ctx = ssl.create_default_context(cafile=site.server_ca_file)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert cert.key_pem is not None
    ctx.load_cert_chain(_write(site.tmp / "raw.crt", cert.cert_pem), _write(site.tmp / "raw.key", cert.key_pem))
    host_port = url.split("/")[2]
    with socket.create_connection(("127.0.0.1", int(host_port.rsplit(":", 1)[1])), timeout=10) as sock:
        ctx.wrap_socket(sock, server_hostname="127.0.0.1").close()


def test_untrusted_ca_fails_the_handshake(site: Site) -> None:
    """TLS refuses it, the app never sees a request.

    asyncio aborts the connection without flushing OpenSSL's alert, so the client sees EOF: under
    TLS 1.2 inside its handshake; under TLS 1.3 (client finishes first) as a connection closed
    before any response.
    """
    acme, stranger = _tenant("acme"), _tenant("acme")  # same tenant name, a CA the server never saw
    ctx = server_ssl_context(site.cert_file, site.key_file, [acme.ca_pem])
    hits: list[bytes | None] = []
    with _serving(ctx, {"acme": acme.ca_pem}, hits) as url:
        intruder = stranger.agent("vm-1")
        with pytest.raises(ssl.SSLError):
            _raw_tls12_handshake(site, url, intruder)
        with _client(site, intruder) as client, pytest.raises(httpx.TransportError):
            client.get(url)  # TLS 1.3
        assert hits == []
        _raw_tls12_handshake(site, url, acme.agent("vm-1"))  # a trusted one completes the TLS 1.2 handshake
        with _client(site, acme.agent("vm-1")) as client:  # and the server is fine afterwards
            assert client.get(url).status_code == 200
        assert len(hits) == 1


def test_cert_of_one_tenant_claiming_another_is_rejected_by_the_app(site: Site) -> None:
    acme, globex = _tenant("acme"), _tenant("globex")
    ctx = server_ssl_context(site.cert_file, site.key_file, [acme.ca_pem, globex.ca_pem])
    with _serving(ctx, {"acme": acme.ca_pem, "globex": globex.ca_pem}) as url:
        # TLS accepts it (acme's CA is trusted); the per-tenant check does not
        with _client(site, acme.agent("vm-1", tenant="globex")) as client:
            r = client.get(url)
        assert r.status_code == 401
        assert "not issued by this tenant's CA" in r.json()["error"]


def test_ca_added_after_start_is_accepted_on_a_new_connection(site: Site) -> None:
    acme, globex = _tenant("acme"), _tenant("globex")
    tenant_cas = {"acme": acme.ca_pem}
    ctx = server_ssl_context(site.cert_file, site.key_file, [acme.ca_pem])
    with _serving(ctx, tenant_cas) as url:
        cert = globex.agent("web-2")
        with _client(site, cert) as client, pytest.raises(httpx.TransportError):
            client.get(url)
        add_client_ca(ctx, globex.ca_pem)
        add_client_ca(ctx, globex.ca_pem)  # adding twice is harmless
        tenant_cas["globex"] = globex.ca_pem
        with _client(site, cert) as client:
            r = client.get(url)
        assert r.status_code == 200, r.text
        assert r.json() == {"tenant": "globex", "role": "agent", "name": "web-2"}


def test_no_ca_at_all(site: Site) -> None:
    """Empty CA list: people still connect; any client certificate fails the handshake."""
    acme = _tenant("acme")
    ctx = server_ssl_context(site.cert_file, site.key_file, [])
    hits: list[bytes | None] = []
    with _serving(ctx, {}, hits) as url:
        with _client(site, None) as client:
            assert client.get(url).status_code == 401
        assert hits == [None]
        with pytest.raises(ssl.SSLError):
            _raw_tls12_handshake(site, url, acme.agent("vm-1"))
        with _client(site, acme.agent("vm-1")) as client, pytest.raises(httpx.TransportError):
            client.get(url)
        assert hits == [None]


def test_the_shim_merges_extensions_and_overrides_a_claimed_certificate() -> None:
    seen: list[dict[str, object]] = []

    async def inner(scope: tls.Scope, receive: tls.Receive, send: tls.Send) -> None:
        seen.append(dict(scope["extensions"]))

    async def receive() -> dict[str, object]:
        return {}

    async def send(message: object) -> None:
        return None

    app = tls._with_client_cert(inner, b"DER")
    scope = {"type": "http", "extensions": {"other": {"x": 1}, "tls": {"client_cert_der": b"forged", "v": 2}}}

    async def call() -> None:
        await app(scope, receive, send)

    asyncio.run(call())
    assert seen == [{"other": {"x": 1}, "tls": {"client_cert_der": b"DER", "v": 2}}]
