"""AWS KMS external key stores: stores (URI prefixes), their SigV4 credentials, their external keys.

The XKS calls themselves are served on the XKS listener (:mod:`keysteward.xks.app`); these routes are
the tenant admin's side. A credential's secret is in the answer that makes it, and nowhere else.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import Field

from keysteward.identity.principal import Permission, Principal
from keysteward.keys.xks_registry import CredentialInfo, KeyLink, NewCredential, StoreInfo
from keysteward.server.deps import need, services
from keysteward.server.schemas import Strict

router = APIRouter(prefix="/xks", tags=["xks"])
Manage = Annotated[Principal, Depends(need(Permission.KEY_MANAGE))]
Read = Annotated[Principal, Depends(need(Permission.KEY_READ))]
Prefix = Annotated[str, Query(max_length=128)]


class StoreCreate(Strict):
    prefix: str = Field(max_length=128)
    region: str = Field(default="us-east-1", max_length=32)


class CredentialAdd(Strict):
    store: str = Field(max_length=128)


class XksKeyCreate(Strict):
    id: str = Field(min_length=1, max_length=128)
    store: str = Field(max_length=128)
    usage: str = Field(default="both", max_length=16)
    key: str | None = Field(default=None, max_length=64)


class XksKeyState(Strict):
    store: str = Field(max_length=128)


def _store(info: StoreInfo) -> dict[str, Any]:
    return {
        "prefix": info.prefix,
        "uri_path": info.uri_path,
        "region": info.region,
        "created_at": info.created_at.isoformat(),
        "active_credentials": info.active_credentials,
    }


def _new(cred: NewCredential) -> dict[str, str]:
    return {"access_key_id": cred.access_key_id, "secret_access_key": cred.secret_access_key}


def _credential(info: CredentialInfo) -> dict[str, Any]:
    retired: datetime | None = info.retired_at
    return {
        "access_key_id": info.access_key_id,
        "store": info.prefix,
        "created_at": info.created_at.isoformat(),
        "retired_at": retired.isoformat() if retired else None,
        "active": retired is None,
    }


def _key(link: KeyLink) -> dict[str, Any]:
    return {
        "id": link.external_id,
        "store": link.prefix,
        "key": link.key_name,
        "usage": link.usage,
        "key_usage": list(link.key_usage),
        "state": link.state,
    }


@router.post("/stores", status_code=201)
def create_store(body: StoreCreate, request: Request, who: Manage) -> dict[str, Any]:
    info, credential = services(request).xks.create_store(who, body.prefix, body.region)
    return {**_store(info), **_new(credential)}


@router.get("/stores")
def list_stores(request: Request, who: Read) -> list[dict[str, Any]]:
    return [_store(s) for s in services(request).xks.list_stores(who)]


@router.post("/credentials", status_code=201)
def add_credential(body: CredentialAdd, request: Request, who: Manage) -> dict[str, Any]:
    return {"store": body.store, **_new(services(request).xks.add_credential(who, body.store))}


@router.get("/credentials")
def list_credentials(store: Prefix, request: Request, who: Read) -> list[dict[str, Any]]:
    return [_credential(c) for c in services(request).xks.list_credentials(who, store)]


@router.post("/credentials/{access_key_id}/retire")
def retire_credential(
    access_key_id: Annotated[str, Path(max_length=32, pattern=r"^[A-Z2-7]{1,32}$")], request: Request, who: Manage
) -> dict[str, Any]:
    return _credential(services(request).xks.retire_credential(who, access_key_id))


@router.post("/keys", status_code=201)
def create_key(body: XksKeyCreate, request: Request, who: Manage) -> dict[str, Any]:
    return _key(services(request).xks.create_key(who, body.store, body.id, body.usage, body.key))


@router.get("/keys")
def list_keys(store: Prefix, request: Request, who: Read) -> list[dict[str, Any]]:
    return [_key(k) for k in services(request).xks.list_keys(who, store)]


@router.post("/keys/{key_id}/disable")
def disable_key(
    key_id: Annotated[str, Path(max_length=128)], body: XksKeyState, request: Request, who: Manage
) -> dict[str, Any]:
    return _key(services(request).xks.set_key_enabled(who, body.store, key_id, False))


@router.post("/keys/{key_id}/enable")
def enable_key(
    key_id: Annotated[str, Path(max_length=128)], body: XksKeyState, request: Request, who: Manage
) -> dict[str, Any]:
    return _key(services(request).xks.set_key_enabled(who, body.store, key_id, True))
