"""The XKS proxy as an ASGI app: route, SigV4, quota, then one access request per key call.

    POST {prefix}/kms/xks/v1/keys/{externalKeyId}/metadata|encrypt|decrypt   -> xks.metadata|encrypt|decrypt
    POST {prefix}/kms/xks/v1/health                                          -> a cached deep probe

Order: the path (404 InvalidUriPathException, also for a prefix no store has), the method (405), the
body (at most ``max_body_bytes``), the client certificate when mTLS is on, SigV4 against the active
credentials of *that* prefix's store (401), its quota (429), then the body (400) and the access path.
The app never touches key material: the handlers of :mod:`keysteward.access.xks_actions` do, after the
tenant's policy permits and before the audit record is committed. Plaintext is never logged.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
from cryptography import x509
from cryptography.x509.oid import NameOID

from keysteward import __version__
from keysteward.access.service import AccessService
from keysteward.access.xks_actions import Encrypted, KeyMetadata, XksInputs, credential_principal, xks_request
from keysteward.audit.refusals import RefusalTally
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import KeystewardError, Sealed
from keysteward.formats import xks_wire as wire
from keysteward.keys.xks_crypto import Probe
from keysteward.keys.xks_registry import StoreRef, XksRegistry
from keysteward.settings import XksSettings
from keysteward.xks import sigv4
from keysteward.xks.errors import to_xks
from keysteward.xks.metrics import XksMetrics
from keysteward.xks.quota import Quotas

log = logging.getLogger("keysteward.xks")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
VENDOR = "keysteward"
TLS_EXTENSION, CLIENT_CERT_DER_KEY = "tls", "client_cert_der"


@dataclass
class _Health:
    at: float
    probe: Probe


class XksApp:
    def __init__(
        self,
        registry: XksRegistry,
        access: AccessService,
        probe: Callable[[], Probe],
        settings: XksSettings,
        metrics: XksMetrics,
        refusals: RefusalTally | None = None,
    ) -> None:
        self.registry = registry
        self.access = access
        self.probe = probe
        self.settings = settings
        self.metrics = metrics
        self.refusals = refusals
        self.quotas = Quotas(settings.quota_tps)
        self.fleet_id = f"keysteward-{socket.gethostname()}"[:64]
        self._health: _Health | None = None
        self._cache_seconds = min(max(settings.health_cache_seconds, 0.0), 60.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        operation, outcome = "unknown", "ok"
        try:
            route = wire.route((scope.get("raw_path") or scope["path"].encode()).decode("latin-1"))
            operation = route.api
            if scope["method"] != "POST":
                await _answer(
                    send, 405, b'{"errorName":"ValidationException","errorMessage":"only POST is allowed"}', allow=True
                )
                outcome = "MethodNotAllowed"
                return
            body = await _read_body(receive, self.settings.max_body_bytes)
            await _answer(send, 200, await self._handle(scope, route, body, started))
        except wire.XksError as exc:
            outcome = exc.name
            await _answer(send, exc.status, exc.body())
        except Exception as exc:  # noqa: BLE001 - the spec's generic failure, never a traceback to the caller
            log.warning("xks %s failed: %s", operation, type(exc).__name__)
            failed = (
                to_xks(exc, "") if isinstance(exc, KeystewardError) else wire.XksError("InternalException", "failed")
            )
            outcome = failed.name
            await _answer(send, failed.status, failed.body())
        finally:
            self.metrics.observe(operation, outcome, time.perf_counter() - started)

    def _authenticate(
        self, scope: Scope, route: wire.Route, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[StoreRef, sigv4.Authorization]:
        store = self.registry.store(route.prefix)
        if store is None:
            raise wire.XksError("InvalidUriPathException", "no external key store has this URI path")
        try:
            self._check_client_cert(scope)
            auth = sigv4.verify(
                method=scope["method"],
                path=(scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
                headers=headers,
                body=body,
                region=store.region,
                secret_of=lambda akid: self.registry.secret(store, akid),
                now=datetime.now(UTC),
                max_skew=self.settings.max_skew_seconds,
            )
        except wire.XksError as exc:  # counted into the store's tenant's audit log, one record per interval
            if self.refusals is not None:
                self.refusals.count(
                    store.tenant_id,
                    f"xks.{route.api}",
                    "authentication_failed",
                    source=_source(scope),
                    target=f"xks_store:{store.prefix}",
                    sample=exc.message,
                )
            raise
        return store, auth

    async def _handle(self, scope: Scope, route: wire.Route, body: bytes, started: float) -> bytes:
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        try:  # on the event loop when the store and the secret are in memory, else in a thread (database reads)
            if self.registry.warm(route.prefix, sigv4.access_key_id(headers)):
                store, auth = self._authenticate(scope, route, headers, body)
            else:
                store, auth = await anyio.to_thread.run_sync(self._authenticate, scope, route, headers, body)
        except Sealed:
            if route.api == "health":  # the credentials are under the root key: say so, nothing more
                return self._health_body(Probe(False, True, 0.0, "sealed"))
            raise wire.XksError("InternalException", "the key manager is sealed") from None
        if not self.quotas.take(store.prefix):
            raise wire.XksError("ThrottlingException", "this external key store's request quota is exceeded")
        if route.api == "health":
            return await self._health_check(body)
        assert route.key_id is not None
        return await self._key_call(scope, store, auth.access_key_id, route, body, started)

    def _check_client_cert(self, scope: Scope) -> None:
        if not self.settings.mtls_subject:
            return
        tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
        der = tls.get(CLIENT_CERT_DER_KEY)
        if not isinstance(der, bytes):
            raise wire.XksError("AuthenticationFailedException", "a client certificate is required")
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [n.value for n in names] != [self.settings.mtls_subject]:
            raise wire.XksError("AuthenticationFailedException", "the client certificate names another subject")

    async def _key_call(
        self, scope: Scope, store: StoreRef, akid: str, route: wire.Route, body: bytes, started: float
    ) -> bytes:
        assert route.key_id is not None
        api = route.api
        if api == "encrypt":
            call = wire.parse_encrypt(body)
            inputs = XksInputs(store, route.key_id, call.metadata, started, encrypt=call)
        elif api == "decrypt":
            dcall = wire.parse_decrypt(body)
            inputs = XksInputs(store, route.key_id, dcall.metadata, started, decrypt=dcall)
        else:
            inputs = XksInputs(store, route.key_id, wire.parse_metadata(body), started)
        request = xks_request(credential_principal(store, akid), f"xks.{api}", inputs, _source(scope))
        try:
            result = await self.access.decide_async(request)
        except KeystewardError as exc:
            raise to_xks(exc, inputs.metadata.request_id) from None
        if isinstance(result, KeyMetadata):
            return wire.encode_metadata(result.enabled, result.usage)
        if isinstance(result, Encrypted):
            return wire.encode_encrypt(result.result, result.integrity)
        try:
            return wire.encode_decrypt(result)
        finally:
            wipe_bytearray(result)

    # -- health -----------------------------------------------------------------------------------
    async def _health_check(self, body: bytes) -> bytes:
        try:
            meta = wire.parse_health(body)
            log.info("xks health check, kmsRequestId %s", meta.request_id[:128])
        except wire.XksError:
            pass  # GetHealthStatus never answers ValidationException: the answer is the health
        cached = self._health
        if cached is None or time.monotonic() - cached.at > self._cache_seconds:
            probe = await anyio.to_thread.run_sync(self.probe)
            cached = self._health = _Health(time.monotonic(), probe)
        return self._health_body(cached.probe)

    def _health_body(self, probe: Probe) -> bytes:
        if probe.working:
            status = "DEGRADED" if probe.database_ms > self.settings.slow_database_ms else "ACTIVE"
        else:
            status = "DEGRADED" if probe.sealed else "UNAVAILABLE"
        member = wire.FleetMember(self.fleet_id, f"keysteward {__version__}", status)
        return wire.encode_health(1, VENDOR, f"keysteward XKS proxy {__version__}", [member])


def _source(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if isinstance(client, tuple | list) and client else ""


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise wire.XksError("ValidationException", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise wire.XksError("ValidationException", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes, *, allow: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if allow:
        headers.append((b"allow", b"POST"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
