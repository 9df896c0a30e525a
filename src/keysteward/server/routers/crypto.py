"""Envelope operations: generate-data-key, encrypt, decrypt, re-encrypt."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from keysteward.crypto.secret import wipe_bytearray
from keysteward.identity.principal import Permission, Principal
from keysteward.server.deps import authorize_async, services
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
    return await authorize_async(request, Permission.KEY_USE)


# These endpoints are coroutines: with the token and key state in memory (the common case) the whole
# request, audit wait included, stays on the event loop; anything that needs the database goes to a thread.


@router.post("/keys/{name}/generate-data-key")
async def generate_data_key(name: KeyName, body: GenerateDataKey, request: Request) -> DataKeyPairOut:
    who = await _user(request)
    envelope = services(request).envelope
    op = envelope.generate_data_key_op(who, name, body.key_spec, body.context)
    pair = await envelope.run_async(who, op, warm=envelope.warm(who, name=name))
    try:
        return DataKeyPairOut(
            key=pair.key, version=pair.version, plaintext=b64(pair.plaintext), ciphertext=b64(pair.ciphertext)
        )
    finally:
        wipe_bytearray(pair.plaintext)


@router.post("/keys/{name}/encrypt")
async def encrypt(name: KeyName, body: EncryptRequest, request: Request) -> CiphertextOut:
    who = await _user(request)
    envelope = services(request).envelope
    op = envelope.encrypt_op(who, name, unb64(body.plaintext), body.context)
    ciphertext, version = await envelope.run_async(who, op, warm=envelope.warm(who, name=name))
    return CiphertextOut(key=name, version=version, ciphertext=b64(ciphertext))


@router.post("/decrypt")
async def decrypt(body: DecryptRequest, request: Request) -> PlaintextOut:
    who = await _user(request)
    envelope = services(request).envelope
    data = unb64(body.ciphertext)
    op = envelope.decrypt_op(who, data, body.context)
    result = await envelope.run_async(who, op, warm=envelope.warm(who, ciphertext=data))
    try:
        return PlaintextOut(key=result.key, version=result.version, plaintext=b64(result.plaintext))
    finally:
        wipe_bytearray(result.plaintext)


@router.post("/re-encrypt")
async def re_encrypt(body: ReEncryptRequest, request: Request) -> CiphertextOut:
    who = await _user(request)
    envelope = services(request).envelope
    op = envelope.re_encrypt_op(
        who, unb64(body.ciphertext), body.context, body.destination_key, body.destination_context
    )
    ciphertext, key, version = await envelope.run_async(who, op, warm=False)
    return CiphertextOut(key=key, version=version, ciphertext=b64(ciphertext))
