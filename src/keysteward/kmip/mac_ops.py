"""KMIP MAC, MACVerify, RNG Retrieve and RNG Seed on the wire.

MAC and MACVerify carry Unique Identifier, Cryptographic Parameters (its Cryptographic Algorithm, when given,
must be the key's), Data and, for MACVerify, MAC Data; the work is the access path's
(:mod:`keysteward.access.kmip_mac`). Only one-part MACs are served: Correlation Value, Init Indicator and
Final Indicator (streaming) answer Feature Not Supported.

RNG Retrieve answers Data Length bytes of the operating system's generator, at most :data:`MAX_RNG_BYTES`
per request (more is Invalid Field, nothing drawn). RNG Seed is answered as the spec allows a server whose
generator takes no seed: Data Length 0, the client's bytes not used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

from keysteward.access.kmip_actions import KmipInputs
from keysteward.access.kmip_mac import HMAC_HASHES, MacRequest
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import CRYPTOGRAPHIC_ALGORITHM
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip.crypto_ops import MAX_DATA
from keysteward.kmip.errors import KmipError

if TYPE_CHECKING:
    from keysteward.kmip.operations import Operations, Session

MAX_RNG_BYTES: Final = 4096
MAX_SEED_BYTES: Final = 4096
VALID, INVALID = 1, 2
"""Validity Indicator."""
_STREAMING: Final = ("CorrelationValue", "InitIndicator", "FinalIndicator")


def _bytes(payload: Item, name: str, limit: int) -> bytes | None:
    item = payload.first(name)
    if item is None:
        return None
    if item.type is not ItemType.BYTE_STRING or not isinstance(item.value, bytes):
        raise KmipError("InvalidField", f"{name} is a byte string")
    if len(item.value) > limit:
        raise KmipError("InvalidField", f"{name} is at most {limit} bytes")
    return item.value


def _mac_request(payload: Item, verifying: bool) -> MacRequest:
    for name in _STREAMING:
        if payload.first(name) is not None:
            raise KmipError("FeatureNotSupported", "MACs are computed in one part (no streaming)")
    algorithm = None
    params = payload.first("CryptographicParameters")
    if params is not None:
        if params.type is not ItemType.STRUCTURE:
            raise KmipError("InvalidField", "Cryptographic Parameters is a structure")
        named = params.first("CryptographicAlgorithm")
        if named is not None:
            if named.type is not ItemType.ENUMERATION or not isinstance(named.value, int):
                raise KmipError("InvalidField", "Cryptographic Algorithm is an enumeration")
            if named.value not in HMAC_HASHES:
                served = ", ".join(n for n, v in CRYPTOGRAPHIC_ALGORITHM.items() if v in HMAC_HASHES)
                raise KmipError("InvalidField", f"the MAC algorithms served are {served}")
            algorithm = named.value
    data = _bytes(payload, "Data", MAX_DATA)
    if data is None:
        raise KmipError("MissingData", "the request carries no Data")
    mac = _bytes(payload, "MacData", 64) if verifying else None
    if verifying and mac is None:
        raise KmipError("MissingData", "MACVerify needs the MAC Data")
    return MacRequest(data, algorithm, mac)


async def _asked(ops: Operations, session: Session, payload: Item, action: str) -> tuple[str, Any]:
    """The object's identifier and what the access path answered ``action`` (MAC or MACVerify)."""
    from keysteward.kmip.operations import uid_of

    uid = uid_of(session, payload)
    request = _mac_request(payload, verifying=action == "kmip.mac_verify")
    done = await ops.access(session, action, KmipInputs(uid=uid, crypto=request, request_id=session.batch_id))
    session.placeholder = uid
    return uid, done


async def mac(ops: Operations, session: Session, payload: Item) -> Item:
    uid, done = await _asked(ops, session, payload, "kmip.mac")
    return t.struct_("ResponsePayload", t.text("UniqueIdentifier", uid), t.byte_string("MacData", done))


async def mac_verify(ops: Operations, session: Session, payload: Item) -> Item:
    uid, valid = await _asked(ops, session, payload, "kmip.mac_verify")
    return t.struct_("ResponsePayload", t.text("UniqueIdentifier", uid),
                     t.enumeration("ValidityIndicator", VALID if valid else INVALID))  # fmt: skip


async def rng_retrieve(ops: Operations, session: Session, payload: Item) -> Item:
    length = payload.first("DataLength")
    if length is None:
        raise KmipError("MissingData", "RNG Retrieve needs a Data Length")
    if length.type is not ItemType.INTEGER or not isinstance(length.value, int) or isinstance(length.value, bool):
        raise KmipError("InvalidField", "Data Length is an integer")
    if not 1 <= length.value <= MAX_RNG_BYTES:
        raise KmipError("InvalidField", f"Data Length is 1 to {MAX_RNG_BYTES} bytes")
    return t.struct_("ResponsePayload", t.byte_string("Data", os.urandom(length.value)))


async def rng_seed(ops: Operations, session: Session, payload: Item) -> Item:
    if _bytes(payload, "Data", MAX_SEED_BYTES) is None:
        raise KmipError("MissingData", "RNG Seed needs Data")
    return t.struct_("ResponsePayload", t.integer("DataLength", 0))
