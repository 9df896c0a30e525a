"""The FastAPI application: routers under /v1, problem+json errors, body limits, metrics, security headers.

Every response says ``Cache-Control: no-store`` (API answers carry keys, tokens and shares; nothing of
it belongs in a cache), and over TLS ``Strict-Transport-Security``. A sealed server refuses every
request that would change state (anything but GET, HEAD and OPTIONS, besides unseal, reset and seal)
with 503 ``sealed``: it could not sign the audit record such a change needs. ``/metrics`` answers
loopback peers, or any peer with a system-tenant token that may read the audit log
(``[server] metrics_access = "token"``: tokens only); its labels are route templates, never names.
"""

from __future__ import annotations

import inspect
import ipaddress
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from keysteward import __version__
from keysteward.errors import BadRequest, Forbidden
from keysteward.identity.principal import Permission, Principal
from keysteward.ratelimit import FailureLimiter
from keysteward.server import problems
from keysteward.server.deps import principal
from keysteward.server.migration_metrics import MigrationMetrics
from keysteward.server.release_lanes import ChallengeLane, ReleaseLane
from keysteward.server.routers import (
    attest,
    audit,
    ca,
    crypto,
    keys,
    kmip,
    policy,
    release,
    system,
    tenants,
    vm_migrations,
    vms,
    volumes,
    xks,
)
from keysteward.server.services import Services

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before the app reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _send_413(send, self.limit)
                return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_413(send, self.limit)


class Metrics:
    """Count requests and time them per route (a plain ASGI middleware: no per-request task switching)."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], path, str(status)).inc()
            self.latency.labels(scope["method"], path).observe(time.perf_counter() - start)


class SecurityHeaders:
    """``Cache-Control: no-store`` on every response; HSTS when the connection is TLS."""

    HSTS = b"max-age=31536000"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tls = scope.get("scheme") == "https"

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                drop = {b"cache-control", b"pragma", b"strict-transport-security", b"x-content-type-options"}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in drop]
                headers += [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
                if tls:
                    headers.append((b"strict-transport-security", self.HSTS))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


SEALED_MAY = frozenset({"/v1/sys/unseal", "/v1/sys/unseal/reset", "/v1/sys/seal"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SealedGuard:
    """While sealed, refuse state changes: the audit signing key is sealed too, so their records could not be signed."""

    def __init__(self, app: ASGIApp, sealed: Callable[[], bool]) -> None:
        self.app = app
        self.sealed = sealed

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] not in SAFE_METHODS
            and scope["path"] not in SEALED_MAY
            and self.sealed()
        ):
            response = problems.problem(
                503,
                "sealed",
                "Server sealed",
                "the key manager is sealed: it cannot sign the audit record this change needs; unseal it first",
                scope["path"][:256],
            )
            await send({"type": "http.response.start", "status": 503, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
            return
        await self.app(scope, receive, send)


METRICS_ACCESS = ("loopback", "token")


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def metrics_reader(mode: str) -> Callable[[Request], Principal | None]:
    """Who may read /metrics: loopback peers (mode "loopback"), and system tokens that may read the audit log."""

    def dependency(request: Request) -> Principal | None:
        peer = request.client.host if request.client else ""
        if mode == "loopback" and _is_loopback(peer) and not request.headers.get("authorization"):
            return None
        who = principal(request)
        if not (who.is_system and who.may(Permission.AUDIT_READ)):
            raise Forbidden("metrics are for the system tenant's admins and auditors", code="role_forbidden")
        return who

    return dependency


class _TooLarge(Exception):
    pass


async def _send_413(send: Any, limit: int) -> None:
    response = problems.problem(
        413, "payload_too_large", "Payload too large", f"request bodies are limited to {limit} bytes"
    )
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _no_native_telemetry() -> dict[str, Any]:
    """FastAPI 0.16x's own OpenTelemetry layer off, where FastAPI has it: keysteward exports its metrics to
    Prometheus itself, and the layer asked OpenTelemetry for its providers (reading the environment) on
    every request."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(svc: Services) -> FastAPI:
    app = FastAPI(
        title="keysteward",
        version=__version__,
        description="Key manager API: seal, tenants, keys, envelope operations, tenant CA, audit, release, volumes.",
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
        **_no_native_telemetry(),
    )
    app.state.services = svc
    seal = svc.settings.seal
    app.state.unseal_limiter = FailureLimiter(
        seal.unseal_failures_per_source, seal.unseal_failures_overall, seal.unseal_failure_window_seconds
    )
    metrics_access = svc.settings.server.metrics_access
    if metrics_access not in METRICS_ACCESS:
        raise BadRequest(
            f"setting server.metrics_access must be one of {', '.join(METRICS_ACCESS)}", code="bad_setting"
        )
    problems.install(app)
    # release first: routes are matched in order, and a boot storm's challenges, releases and renewals are
    # most of the requests (no other module has a path its four can shadow);
    # vm_migrations before vms: its /vms/{ref}/migrate must win over /vms/{ref}/{kind}
    modules = [release, system, tenants, keys, crypto, ca, audit, volumes, vm_migrations, vms]
    modules += [policy, attest, xks, kmip]
    for module in modules:
        app.include_router(module.router, prefix="/v1")

    registry = CollectorRegistry()
    requests = Counter(
        "keysteward_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "keysteward_http_request_seconds",
        "HTTP request latency",
        ["method", "route"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    )
    svc.xks_metrics.register(registry)
    registry.register(MigrationMetrics(svc.db))
    sealed = Gauge("keysteward_sealed", "1 while the server is sealed", registry=registry)
    sealed.set_function(lambda: 1.0 if svc.root.sealed else 0.0)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_reader(metrics_access))])
    def metrics() -> Response:
        text = generate_latest(registry)
        if svc.kmip_metrics is not None:
            text += generate_latest(svc.kmip_metrics)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    # outermost last: headers on every answer (413s and sealed refusals too), the sealed guard before routing
    # and before the lanes of a boot storm's two requests (the challenge and the release)
    routes = {getattr(r, "endpoint", None): r for r in release.router.routes}
    app.add_middleware(ReleaseLane, svc=svc, route=routes[release.release])
    app.add_middleware(ChallengeLane, nonces=svc.nonces, route=routes[release.challenge])
    app.add_middleware(SealedGuard, sealed=lambda: svc.root.sealed)
    app.add_middleware(Metrics, requests=requests, latency=latency)
    app.add_middleware(BodyLimit, limit=svc.settings.server.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    return app
