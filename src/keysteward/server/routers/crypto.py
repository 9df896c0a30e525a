"""Envelope operations: generate-data-key, encrypt, decrypt, re-encrypt."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from keysteward.access.key_actions import DataKeyPair, Decrypted
from keysteward.crypto.secret import wipe_bytearray
from keysteward.identity.principal import Principal
from keysteward.server.deps import authenticate_async, services
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


async def _user(request: Request) -> Principal:
    """Any authenticated principal of a tenant may ask; the tenant's policy decides (the access path)."""
    return await authenticate_async(request)


def _source(request: Request) -> str:
    return request.client.host if request.client else ""


# These endpoints are coroutines: with the token and key state in memory (the common case) the whole
# request, audit wait included, stays on the event loop; anything that needs the database goes to a thread.


@router.post("/keys/{name}/generate-data-key")
async def generate_data_key(name: KeyName, body: GenerateDataKey, request: Request) -> DataKeyPairOut:
    who = await _user(request)
    keyuse = services(request).envelope
    ask = keyuse.generate_data_key_request(who, name, body.key_spec, body.context, _source(request))
    pair: DataKeyPair = await services(request).access.decide_async(ask)
    try:
        return DataKeyPairOut(
            key=pair.key, version=pair.version, plaintext=b64(pair.plaintext), ciphertext=b64(pair.ciphertext)
        )
    finally:
        wipe_bytearray(pair.plaintext)


@router.post("/keys/{name}/encrypt")
async def encrypt(name: KeyName, body: EncryptRequest, request: Request) -> CiphertextOut:
    who = await _user(request)
    ask = services(request).envelope.encrypt_request(who, name, unb64(body.plaintext), body.context, _source(request))
    ciphertext, version = await services(request).access.decide_async(ask)
    return CiphertextOut(key=name, version=version, ciphertext=b64(ciphertext))


@router.post("/decrypt")
async def decrypt(body: DecryptRequest, request: Request) -> PlaintextOut:
    who = await _user(request)
    ask = services(request).envelope.decrypt_request(who, unb64(body.ciphertext), body.context, _source(request))
    result: Decrypted = await services(request).access.decide_async(ask)
    try:
        return PlaintextOut(key=result.key, version=result.version, plaintext=b64(result.plaintext))
    finally:
        wipe_bytearray(result.plaintext)


@router.post("/re-encrypt")
async def re_encrypt(body: ReEncryptRequest, request: Request) -> CiphertextOut:
    who = await _user(request)
    ask = services(request).envelope.re_encrypt_request(
        who, unb64(body.ciphertext), body.context, body.destination_key, body.destination_context, _source(request)
    )
    ciphertext, key, version = await services(request).access.decide_async(ask)
    return CiphertextOut(key=key, version=version, ciphertext=b64(ciphertext))
