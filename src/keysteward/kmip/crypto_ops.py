"""KMIP Encrypt and Decrypt on the wire: Cryptographic Parameters (GCM, or CBC with PKCS#5 padding), Data,
IV/Counter/Nonce, Authenticated Encryption Additional Data and Tag; the work is the access path's
(:mod:`keysteward.access.kmip_crypto`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keysteward.access.kmip_actions import KmipInputs
from keysteward.access.kmip_crypto import CryptoRequest, CryptoResult
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import BLOCK_CIPHER_MODE, PADDING_METHOD
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip.errors import KmipError

if TYPE_CHECKING:
    from keysteward.kmip.operations import Operations, Session

MAX_DATA = 65536


def _bytes(payload: Item, name: str) -> bytes | None:
    item = payload.first(name)
    if item is None:
        return None
    if item.type is not ItemType.BYTE_STRING or not isinstance(item.value, bytes):
        raise KmipError("InvalidField", f"{name} is a byte string")
    return item.value


def _request(payload: Item, decrypting: bool) -> CryptoRequest:
    mode = "GCM"
    params = payload.first("CryptographicParameters")
    if params is not None:
        block = params.first("BlockCipherMode")
        pad = params.first("PaddingMethod")
        if block is not None and block.value == BLOCK_CIPHER_MODE["Cbc"]:
            mode = "CBC"
            if pad is not None and pad.value not in (PADDING_METHOD["Pkcs5"],):
                raise KmipError("InvalidField", "CBC is served with PKCS#5 padding")
        elif block is not None and block.value != BLOCK_CIPHER_MODE["Gcm"]:
            raise KmipError("InvalidField", "the block cipher modes served are GCM and CBC")
    data = _bytes(payload, "Data")
    if data is None:
        raise KmipError("MissingData", "the request carries no Data")
    if len(data) > MAX_DATA:
        raise KmipError("InvalidField", f"Data is at most {MAX_DATA} bytes")
    aad = _bytes(payload, "AuthenticatedEncryptionAdditionalData") or b""
    tag = _bytes(payload, "AuthenticatedEncryptionTag") if decrypting else None
    return CryptoRequest(mode, data, _bytes(payload, "IvCounterNonce"), aad, tag)


async def encrypt(ops: Operations, session: Session, payload: Item) -> Item:
    return await _run(ops, session, payload, "kmip.encrypt")


async def decrypt(ops: Operations, session: Session, payload: Item) -> Item:
    return await _run(ops, session, payload, "kmip.decrypt")


async def _run(ops: Operations, session: Session, payload: Item, action: str) -> Item:
    from keysteward.kmip.operations import uid_of

    uid = uid_of(session, payload)
    request = _request(payload, action == "kmip.decrypt")
    inputs = KmipInputs(uid=uid, crypto=request, request_id=session.batch_id)
    result: CryptoResult = await ops.access(session, action, inputs)
    session.placeholder = uid
    return t.struct_(
        "ResponsePayload",
        t.text("UniqueIdentifier", uid),
        t.byte_string("Data", result.data),
        t.byte_string("IvCounterNonce", result.iv) if result.iv is not None else None,
        t.byte_string("AuthenticatedEncryptionTag", result.tag) if result.tag is not None else None,
    )
