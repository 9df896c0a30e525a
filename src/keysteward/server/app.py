"""The FastAPI application: routers under /v1, problem+json errors, body limits, metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from keysteward import __version__
from keysteward.server import problems
from keysteward.server.ratelimit import FailureLimiter
from keysteward.server.routers import attest, audit, ca, crypto, keys, policy, release, system, tenants, volumes
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


class _TooLarge(Exception):
    pass


async def _send_413(send: Any, limit: int) -> None:
    response = problems.problem(
        413, "payload_too_large", "Payload too large", f"request bodies are limited to {limit} bytes"
    )
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def create_app(svc: Services) -> FastAPI:
    app = FastAPI(
        title="keysteward",
        version=__version__,
        description="Key manager API: seal, tenants, keys, envelope operations, tenant CA, audit, release, volumes.",
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
    )
    app.state.services = svc
    seal = svc.settings.seal
    app.state.unseal_limiter = FailureLimiter(
        seal.unseal_failures_per_source, seal.unseal_failures_overall, seal.unseal_failure_window_seconds
    )
    problems.install(app)
    for module in (system, tenants, keys, crypto, ca, audit, release, volumes, policy, attest):
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
    sealed = Gauge("keysteward_sealed", "1 while the server is sealed", registry=registry)
    sealed.set_function(lambda: 1.0 if svc.root.sealed else 0.0)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Metrics, requests=requests, latency=latency)
    app.add_middleware(BodyLimit, limit=svc.settings.server.max_body_bytes)
    return app
