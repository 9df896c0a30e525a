"""Tenants (system admins) and API tokens (tenant admins)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from keysteward.identity.principal import Permission, Principal
from keysteward.identity.tenants import NewToken, TokenInfo
from keysteward.server.deps import need, principal, services
from keysteward.server.schemas import TenantCreate, TenantCreated, TenantOut, TokenCreate, TokenOut, WhoAmI

router = APIRouter(tags=["tenants"])


def _token_out(info: TokenInfo, secret: str | None = None) -> TokenOut:
    return TokenOut(
        id=info.id,
        tenant=info.tenant,
        name=info.name,
        role=info.role,
        created_at=info.created_at,
        revoked=info.revoked,
        person=info.person,
        created_by=info.created_by,
        expires_at=info.expires_at,
        token=secret,
    )


def _new_token_out(token: NewToken) -> TokenOut:
    return _token_out(token.info, token.secret)


@router.get("/whoami", response_model_exclude_none=True)
def whoami(who: Annotated[Principal, Depends(principal)]) -> WhoAmI:
    return WhoAmI(tenant=who.tenant, role=who.role, name=who.name, kind=who.kind, person=who.person or None)


@router.post("/tenants", status_code=201)
def create_tenant(
    body: TenantCreate, request: Request, who: Annotated[Principal, Depends(need(Permission.TENANT_MANAGE))]
) -> TenantCreated:
    tenant, token = services(request).tenants.create(body.name, actor=who, first_admin=body.first_admin)
    return TenantCreated(
        tenant=TenantOut(id=tenant.id, name=tenant.name, created_at=tenant.created_at),
        admin_token=_new_token_out(token),
    )


@router.get("/tenants")
def list_tenants(
    request: Request, who: Annotated[Principal, Depends(need(Permission.TENANT_MANAGE))]
) -> list[TenantOut]:
    return [TenantOut(id=t.id, name=t.name, created_at=t.created_at) for t in services(request).tenants.list_tenants()]


@router.post("/tokens", status_code=201)
def create_token(
    body: TokenCreate, request: Request, who: Annotated[Principal, Depends(need(Permission.TOKEN_MANAGE))]
) -> TokenOut:
    return _new_token_out(
        services(request).tenants.create_token(who, body.name, body.role, body.person, body.ttl_seconds)
    )


@router.get("/tokens")
def list_tokens(request: Request, who: Annotated[Principal, Depends(need(Permission.TOKEN_MANAGE))]) -> list[TokenOut]:
    return [_token_out(t) for t in services(request).tenants.list_tokens(who)]


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(
    token_id: str, request: Request, who: Annotated[Principal, Depends(need(Permission.TOKEN_MANAGE))]
) -> None:
    services(request).tenants.revoke_token(who, token_id)
