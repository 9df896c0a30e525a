"""TLS for the API server: one port for people (bearer tokens) and machines (mutual TLS).

The server context asks every client for a certificate but does not require one
(``CERT_OPTIONAL``): people connect without one and authenticate with a token; agents and hosts
present the client certificate their tenant's CA issued. OpenSSL checks a presented certificate
against the union of all tenant CAs (a certificate from an unknown CA fails the handshake); which
tenant it belongs to, and whether that tenant's CA issued it, is decided per request by
:func:`keysteward.crypto.x509identity.verify_client_cert` with the certificate this module hands to the app:

    scope["extensions"]["tls"]["client_cert_der"]  # DER bytes, or None without a client cert

uvicorn does not put the peer certificate into the ASGI scope, so :class:`ClientCertH11Protocol`
(uvicorn's h11 protocol plus that one step) does, and :func:`uvicorn_server` wires it up.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import uvicorn
from starlette.requests import HTTPConnection
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from keysteward.errors import BadRequest

__all__ = [
    "CLIENT_CERT_DER_KEY",
    "TLS_EXTENSION",
    "ClientCertH11Protocol",
    "ClientCertHttpToolsProtocol",
    "add_client_ca",
    "client_cert_der",
    "server_ssl_context",
    "uvicorn_server",
]

TLS_EXTENSION = "tls"
# TLS 1.2: only ECDHE key exchange (forward secrecy) with an AEAD (AES-GCM, ChaCha20-Poly1305); no CBC,
# no static-RSA key transport, no finite-field DHE (client-chosen group sizes, costly handshakes)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
CLIENT_CERT_DER_KEY = "client_cert_der"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def server_ssl_context(cert_file: str, key_file: str, client_ca_pems: Iterable[str]) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2+ (AEAD, forward-secret suites only), client certificates optional.

    With no CA at all the context still works: a certificate is still requested (OpenSSL sends an
    empty CA list), clients without one connect normally, and a client that presents one fails the
    handshake (nothing can verify it). Tenant CAs are trust anchors even when they are
    intermediates of a customer's PKI (``VERIFY_X509_PARTIAL_CHAIN``).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3's suites are all AEAD with (EC)DHE already
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    for pem in client_ca_pems:
        add_client_ca(ctx, pem)
    return ctx


def add_client_ca(ctx: ssl.SSLContext, pem: str) -> None:
    """Trust one more tenant CA for client certificates; handshakes that start afterwards see it.

    Adding a CA twice is harmless. A live context cannot forget a CA: build a new context (and
    restart the listener) to drop one; until then the per-tenant check in the app still refuses
    certificates from a CA the tenant no longer has.
    """
    try:
        ctx.load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError, TypeError) as exc:
        raise BadRequest("client CA is not a PEM certificate", code="bad_pem") from exc


def _with_client_cert(app: ASGIApp, cert_der: bytes | None) -> ASGIApp:
    async def app_with_client_cert(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            extensions = dict(scope.get("extensions") or {})
            tls = dict(extensions.get(TLS_EXTENSION) or {})
            tls[CLIENT_CERT_DER_KEY] = cert_der  # always ours: never what an inner layer claimed
            extensions[TLS_EXTENSION] = tls
            scope["extensions"] = extensions
        await app(scope, receive, send)

    return app_with_client_cert


def _peer_cert(transport: asyncio.Transport) -> bytes | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return ssl_object.getpeercert(binary_form=True)
    return None


class ClientCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that gives the app the TLS client certificate of the connection.

    asyncio calls ``connection_made`` after the TLS handshake has completed, so the peer
    certificate (already verified by OpenSSL against the context's CAs) is known there; every
    request on the connection then carries it in ``scope["extensions"]["tls"]``. WebSocket
    upgrades are handed to uvicorn's WebSocket protocol, which does not get it.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _with_client_cert(self.config.loaded_app, _peer_cert(transport))


class ClientCertHttpToolsProtocol(HttpToolsProtocol):
    """The same for uvicorn's httptools protocol (C parser: the faster one, used when installed)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _with_client_cert(self.config.loaded_app, _peer_cert(transport))


def uvicorn_server(
    app: Any,
    host: str,
    port: int,
    ssl_context_factory: Callable[[], ssl.SSLContext] | ssl.SSLContext,
    **kw: Any,
) -> uvicorn.Server:
    """A uvicorn server over TLS with :class:`ClientCertH11Protocol`; ``kw`` goes to ``uvicorn.Config``.

    Pass the context itself to keep a handle for :func:`add_client_ca`; a factory is called once,
    when uvicorn loads its config (``server.config.ssl`` is the context afterwards).
    """
    reserved = {"http", "http2", "ssl_context_factory"} | {k for k in kw if k.startswith("ssl_")}
    clash = reserved & kw.keys()
    if clash:
        raise TypeError(f"uvicorn_server sets {sorted(clash)} itself")

    def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        if isinstance(ssl_context_factory, ssl.SSLContext):
            return ssl_context_factory
        return ssl_context_factory()

    config = uvicorn.Config(
        app, host=host, port=port, http=ClientCertHttpToolsProtocol, ssl_context_factory=factory, **kw
    )
    return uvicorn.Server(config)


def client_cert_der(request: HTTPConnection) -> bytes | None:
    """The DER client certificate of this request's TLS connection, or None."""
    tls = (request.scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    der = tls.get(CLIENT_CERT_DER_KEY)
    return der if isinstance(der, bytes) else None
