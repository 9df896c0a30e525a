"""Envelope operations: generate-data-key, encrypt, decrypt, re-encrypt."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from keysteward.identity.principal import Permission, Principal
from keysteward.server.deps import need, services
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
Use = Annotated[Principal, Depends(need(Permission.KEY_USE))]


@router.post("/keys/{name}/generate-data-key")
def generate_data_key(name: KeyName, body: GenerateDataKey, request: Request, who: Use) -> DataKeyPairOut:
    pair = services(request).envelope.generate_data_key(who, name, key_spec=body.key_spec, context=body.context)
    try:
        return DataKeyPairOut(
            key=pair.key, version=pair.version, plaintext=b64(pair.plaintext), ciphertext=b64(pair.ciphertext)
        )
    finally:
        pair.plaintext[:] = bytes(len(pair.plaintext))


@router.post("/keys/{name}/encrypt")
def encrypt(name: KeyName, body: EncryptRequest, request: Request, who: Use) -> CiphertextOut:
    ciphertext, version = services(request).envelope.encrypt(who, name, unb64(body.plaintext), body.context)
    return CiphertextOut(key=name, version=version, ciphertext=b64(ciphertext))


@router.post("/decrypt")
def decrypt(body: DecryptRequest, request: Request, who: Use) -> PlaintextOut:
    result = services(request).envelope.decrypt(who, unb64(body.ciphertext), body.context)
    try:
        return PlaintextOut(key=result.key, version=result.version, plaintext=b64(result.plaintext))
    finally:
        result.plaintext[:] = bytes(len(result.plaintext))


@router.post("/re-encrypt")
def re_encrypt(body: ReEncryptRequest, request: Request, who: Use) -> CiphertextOut:
    ciphertext, key, version = services(request).envelope.re_encrypt(
        who,
        unb64(body.ciphertext),
        context=body.context,
        destination_key=body.destination_key,
        destination_context=body.destination_context,
    )
    return CiphertextOut(key=key, version=version, ciphertext=b64(ciphertext))
