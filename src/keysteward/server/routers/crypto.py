"""Envelope operations: generate-data-key, encrypt, decrypt, re-encrypt."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from keysteward.identity.principal import Permission, Principal
from keysteward.server.deps import authorize, services
from keysteward.server.schemas import (
    CiphertextOut,
    DataKeyPairOut,
    DecryptRequest,
    EncryptRequest,
    GenerateDataKey,
    PlaintextOut,
    ReEncryptRequest,
    b64,
    unb64,
)

router = APIRouter(tags=["crypto"])
KeyName = Annotated[str, Path(max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


def _user(request: Request) -> Principal:
    # authorised inside the endpoint rather than by a dependency: one thread hop per request, not two
    return authorize(request, Permission.KEY_USE)


@router.post("/keys/{name}/generate-data-key")
def generate_data_key(name: KeyName, body: GenerateDataKey, request: Request) -> DataKeyPairOut:
    who = _user(request)
    pair = services(request).envelope.generate_data_key(who, name, key_spec=body.key_spec, context=body.context)
    try:
        return DataKeyPairOut(
            key=pair.key, version=pair.version, plaintext=b64(pair.plaintext), ciphertext=b64(pair.ciphertext)
        )
    finally:
        pair.plaintext[:] = bytes(len(pair.plaintext))


@router.post("/keys/{name}/encrypt")
def encrypt(name: KeyName, body: EncryptRequest, request: Request) -> CiphertextOut:
    who = _user(request)
    ciphertext, version = services(request).envelope.encrypt(who, name, unb64(body.plaintext), body.context)
    return CiphertextOut(key=name, version=version, ciphertext=b64(ciphertext))


@router.post("/decrypt")
def decrypt(body: DecryptRequest, request: Request) -> PlaintextOut:
    who = _user(request)
    result = services(request).envelope.decrypt(who, unb64(body.ciphertext), body.context)
    try:
        return PlaintextOut(key=result.key, version=result.version, plaintext=b64(result.plaintext))
    finally:
        result.plaintext[:] = bytes(len(result.plaintext))


@router.post("/re-encrypt")
def re_encrypt(body: ReEncryptRequest, request: Request) -> CiphertextOut:
    who = _user(request)
    ciphertext, key, version = services(request).envelope.re_encrypt(
        who,
        unb64(body.ciphertext),
        context=body.context,
        destination_key=body.destination_key,
        destination_context=body.destination_context,
    )
    return CiphertextOut(key=key, version=version, ciphertext=b64(ciphertext))
