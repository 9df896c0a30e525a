"""Request dependencies: the services, the calling principal, and permission checks (denials are audited)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import Request

from keysteward.access.request import AccessRequest, Delivery, RequestContext, Resource
from keysteward.errors import KeystewardError, Unauthenticated
from keysteward.identity.principal import Permission, Principal
from keysteward.server.services import Services
from keysteward.server.tls import client_cert_der


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def request_context(request: Request) -> RequestContext:
    """What the access path knows of the HTTP request: the caller's address."""
    return RequestContext(source=request.client.host if request.client else "")


def decide_as(
    request: Request,
    who: Principal,
    action: str,
    resource: Resource,
    inputs: object,
    delivery: Delivery = Delivery.NOTHING,
) -> Any:
    """An authenticated caller's request of ``action`` on ``resource``, decided by the one access path."""
    return services(request).access.decide(
        AccessRequest(tenant=who.tenant, action=action, resource=resource, delivery=delivery, principal=who,
                      context=request_context(request), inputs=inputs)
    )  # fmt: skip


def principal(request: Request) -> Principal:
    svc = services(request)
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("use 'Authorization: Bearer <token>'", code="bad_token")
        return svc.tenants.authenticate(token.strip())
    der = client_cert_der(request)
    if der:
        return svc.cas.authenticate(der)
    raise Unauthenticated("send an API token (Authorization: Bearer) or a client certificate", code="no_credentials")


def authorize(request: Request, permission: Permission) -> Principal:
    who = principal(request)
    try:
        who.require(permission)
    except KeystewardError as exc:
        services(request).audit.record(
            who.tenant_id,
            actor=who.describe(),
            action=permission.value,
            target=request.url.path,
            outcome="denied",
            reason=exc.code,
        )
        raise
    return who


async def authorize_async(request: Request, permission: Permission) -> Principal:
    """:func:`authorize` on the event loop: a token seen within the last second needs no thread."""
    svc = services(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    der = client_cert_der(request)
    if header:
        who = svc.tenants.seen(token.strip()) if scheme.lower() == "bearer" else None
    else:
        who = svc.cas.seen(der) if der else None
    if who is None or not who.may(permission):
        return await anyio.to_thread.run_sync(authorize, request, permission)
    return who


async def authenticate_async(request: Request) -> Principal:
    """The caller, proven by its token or certificate, with no role check: for the routes where the tenant's
    policy decides (the access path). A token or certificate seen within the last second needs no thread."""
    svc = services(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if header:
        who = svc.tenants.seen(token.strip()) if scheme.lower() == "bearer" else None
    else:
        der = client_cert_der(request)
        who = svc.cas.seen(der) if der else None
    if who is None:
        return await anyio.to_thread.run_sync(principal, request)
    return who


def need(permission: Permission) -> Callable[[Request], Principal]:
    """``Depends(need(Permission.X))`` in a route signature."""

    def dependency(request: Request) -> Principal:
        return authorize(request, permission)

    return dependency
