"""Key lifecycle: create, list, describe, rotate, enable/disable, destroy; stored data keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from keysteward.identity.principal import Permission, Principal
from keysteward.keys.model import DataKeyInfo, KeyInfo
from keysteward.server.deps import need, services
from keysteward.server.schemas import DataKeyCreate, DataKeyOut, DestroyVersion, KeyCreate, KeyOut, VersionOut

router = APIRouter(prefix="/keys", tags=["keys"])
KeyName = Annotated[str, Path(max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Manage = Annotated[Principal, Depends(need(Permission.KEY_MANAGE))]
Read = Annotated[Principal, Depends(need(Permission.KEY_READ))]


def key_out(info: KeyInfo) -> KeyOut:
    return KeyOut(
        id=info.id,
        name=info.name,
        description=info.description,
        state=info.state,
        primary_version=info.primary_version,
        created_at=info.created_at,
        versions=[
            VersionOut(
                version=v.version,
                state=v.state,
                created_at=v.created_at,
                destroyed_at=v.destroyed_at,
                data_keys=v.data_keys,
            )
            for v in info.versions
        ],
        rotation=info.rotation,
    )


def _dek_out(info: DataKeyInfo) -> DataKeyOut:
    return DataKeyOut(
        id=info.id,
        name=info.name,
        key=info.key,
        kek_version=info.kek_version,
        created_at=info.created_at,
        shredded=info.shredded,
    )


@router.post("", status_code=201)
def create_key(body: KeyCreate, request: Request, who: Manage) -> KeyOut:
    return key_out(services(request).keys.create(who, body.name, body.description))


@router.get("")
def list_keys(request: Request, who: Read) -> list[KeyOut]:
    return [key_out(k) for k in services(request).keys.list_keys(who)]


@router.get("/{name}")
def describe_key(name: KeyName, request: Request, who: Read) -> KeyOut:
    return key_out(services(request).keys.describe(who, name))


@router.post("/{name}/rotate")
def rotate_key(name: KeyName, request: Request, who: Manage) -> KeyOut:
    return key_out(services(request).keys.rotate(who, name))


@router.post("/{name}/disable")
def disable_key(name: KeyName, request: Request, who: Manage) -> KeyOut:
    return key_out(services(request).keys.set_enabled(who, name, False))


@router.post("/{name}/enable")
def enable_key(name: KeyName, request: Request, who: Manage) -> KeyOut:
    return key_out(services(request).keys.set_enabled(who, name, True))


@router.post("/{name}/versions/{version}/destroy")
def destroy_version(
    name: KeyName,
    version: Annotated[int, Path(ge=1, le=2**31)],
    body: DestroyVersion,
    request: Request,
    who: Manage,
) -> KeyOut:
    return key_out(services(request).keys.destroy_version(who, name, version, force=body.force))


@router.post("/{name}/destroy")
def destroy_key(name: KeyName, request: Request, who: Manage) -> KeyOut:
    return key_out(services(request).keys.destroy(who, name))


@router.post("/{name}/data-keys", status_code=201)
def create_data_key(name: KeyName, body: DataKeyCreate, request: Request, who: Manage) -> DataKeyOut:
    return _dek_out(services(request).keys.data.create(who, name, body.name))


@router.get("/{name}/data-keys")
def list_data_keys(name: KeyName, request: Request, who: Read) -> list[DataKeyOut]:
    return [_dek_out(d) for d in services(request).keys.data.listing(who, name)]
