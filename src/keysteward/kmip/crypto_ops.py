"""KMIP Encrypt and Decrypt on the wire: Cryptographic Parameters (GCM, or CBC with PKCS#5 padding), Data,
IV/Counter/Nonce, Authenticated Encryption Additional Data and Tag; the work is the access path's
(:mod:`keysteward.access.kmip_crypto`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keysteward.access.kmip_actions import KmipInputs
from keysteward.access.kmip_crypto import CryptoRequest, CryptoResult, parameters
from keysteward.errors import KeystewardError
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip.errors import KmipError, from_keysteward

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


def _request(payload: Item, decrypting: bool, major: int) -> CryptoRequest:
    params = payload.first("CryptographicParameters")
    try:
        mode, padded, tag_length = parameters(params)
    except KeystewardError as exc:
        raise from_keysteward(exc, major) from None
    data = _bytes(payload, "Data")
    if data is None:
        raise KmipError("MissingData", "the request carries no Data")
    if len(data) > MAX_DATA:
        raise KmipError("InvalidField", f"Data is at most {MAX_DATA} bytes")
    aad = _bytes(payload, "AuthenticatedEncryptionAdditionalData") or b""
    tag = _bytes(payload, "AuthenticatedEncryptionTag") if decrypting else None
    iv = _bytes(payload, "IvCounterNonce")
    return CryptoRequest(mode, data, iv, aad, tag, padded, tag_length, explicit=params is not None)


async def encrypt(ops: Operations, session: Session, payload: Item) -> Item:
    return await _run(ops, session, payload, "kmip.encrypt")


async def decrypt(ops: Operations, session: Session, payload: Item) -> Item:
    return await _run(ops, session, payload, "kmip.decrypt")


async def _run(ops: Operations, session: Session, payload: Item, action: str) -> Item:
    from keysteward.kmip.operations import uid_of

    uid = uid_of(session, payload)
    request = _request(payload, action == "kmip.decrypt", session.version[0])
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
