"""KMIP Check, ReKey, AdjustAttribute (2.x) and Get in a key-wrapped format, on the wire.

The work is the access path's (:mod:`keysteward.access.kmip_lifecycle`, :mod:`keysteward.access.kmip_wrap`);
here each payload is read strictly: a field of the wrong type, a missing one or a value out of range answers
the Result Reason the spec names before anything is asked of the access path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from keysteward.access.kmip_actions import KmipInputs
from keysteward.access.kmip_attributes import Attributes
from keysteward.access.kmip_lifecycle import AdjustRequest, CheckRequest, ReKeyRequest
from keysteward.access.kmip_wrap import PADDED, PLAIN, WrapRequest
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import BLOCK_CIPHER_MODE, KEY_FORMAT_TYPE, OBJECT_TYPE
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip import attributes as attrs
from keysteward.kmip import v2
from keysteward.kmip.errors import KmipError

if TYPE_CHECKING:
    from keysteward.kmip.operations import Operations, Session

ADJUSTMENTS: Final = {1: "increment", 2: "decrement", 3: "negate"}
"""Adjustment Type."""
WRAP_MODES: Final = {BLOCK_CIPHER_MODE["NistKeyWrap"]: PLAIN, BLOCK_CIPHER_MODE["AesKeyWrapPadding"]: PADDED}
ENCRYPT_METHOD: Final = 1
"""Wrapping Method Encrypt (the only one served: MAC/sign wrapping is not)."""
MAX_OFFSET: Final = 10 * 365 * 86400


def _int(payload: Item, name: str, kinds: tuple[ItemType, ...] = (ItemType.INTEGER,)) -> int | None:
    item = payload.first(name)
    if item is None:
        return None
    if item.type not in kinds or not isinstance(item.value, int) or isinstance(item.value, bool):
        raise KmipError("InvalidField", f"{name} is an {kinds[0].name.lower()}")
    return item.value


def _uid(session: Session, payload: Item) -> str:
    from keysteward.kmip.operations import uid_of

    return uid_of(session, payload)


async def check(ops: Operations, session: Session, payload: Item) -> Item:
    uid = _uid(session, payload)
    count = _int(payload, "UsageLimitsCount", (ItemType.LONG_INTEGER, ItemType.INTEGER))
    mask = _int(payload, "CryptographicUsageMask")
    lease = _int(payload, "LeaseTime", (ItemType.INTERVAL,))
    if (count is not None and count < 0) or (mask is not None and mask < 0):
        raise KmipError("InvalidField", "Usage Limits Count and Cryptographic Usage Mask are not negative")
    inputs = KmipInputs(uid=uid, crypto=CheckRequest(count, mask, lease), request_id=session.batch_id)
    await ops.access(session, "kmip.check", inputs)
    session.placeholder = uid
    return t.struct_("ResponsePayload", t.text("UniqueIdentifier", uid))


async def rekey(ops: Operations, session: Session, payload: Item) -> Item:
    uid = _uid(session, payload)
    offset = _int(payload, "Offset", (ItemType.INTERVAL,))
    if offset is not None and offset > MAX_OFFSET:
        raise KmipError("InvalidField", "the Offset is at most ten years")
    if session.version[0] >= 2:
        template = v2.template(payload)
    else:
        template = attrs.template(payload)
    for name, _ in template:
        if name in ("Cryptographic Algorithm", "Cryptographic Length"):
            raise KmipError("InvalidField", "ReKey keeps the key's algorithm and length")
    new_uid = ops.kmip.new_uid()
    inputs = KmipInputs(uid=uid, crypto=ReKeyRequest(new_uid, offset, tuple(template)), request_id=session.batch_id)
    await ops.access(session, "kmip.rekey", inputs)
    session.placeholder = new_uid
    return t.struct_("ResponsePayload", t.text("UniqueIdentifier", new_uid))


async def adjust_attribute(ops: Operations, session: Session, payload: Item) -> Item:
    if session.version[0] < 2:
        raise KmipError("OperationNotSupported", "AdjustAttribute is a KMIP 2 operation")
    uid = _uid(session, payload)
    names = v2.references(payload)
    if len(names) != 1:
        raise KmipError("MissingData", "AdjustAttribute names one attribute")
    kind = payload.first("AdjustmentType")
    if kind is None or kind.type is not ItemType.ENUMERATION or kind.value not in ADJUSTMENTS:
        raise KmipError("InvalidField", "the Adjustment Type is Increment, Decrement or Negate")
    name = names[0]
    amount = payload.first("AdjustmentValue")
    try:
        attrs.deletable(name)  # a client's own attributes only, never the server's or the create-only ones
    except KmipError as exc:
        raise KmipError("AttributeReadOnly" if exc.code == "kmip_read_only" else "UnsupportedAttribute",
                        exc.message, exc.code) from None  # fmt: skip
    request = AdjustRequest(name, ADJUSTMENTS[int(kind.value)], amount)
    await ops.access(session, "kmip.adjust_attribute", KmipInputs(uid=uid, crypto=request,
                                                                   request_id=session.batch_id))  # fmt: skip
    session.placeholder = uid
    return t.struct_("ResponsePayload", t.text("UniqueIdentifier", uid))


def wrap_request(spec: Item) -> WrapRequest:
    """A Key Wrapping Specification: Encrypt with another KMIP AES key, RFC 3394 (default) or RFC 5649."""
    if spec.type is not ItemType.STRUCTURE:
        raise KmipError("InvalidField", "Key Wrapping Specification is a structure")
    method = spec.first("WrappingMethod")
    if method is None or method.type is not ItemType.ENUMERATION:
        raise KmipError("MissingData", "the Key Wrapping Specification needs a Wrapping Method")
    if method.value != ENCRYPT_METHOD:
        raise KmipError("FeatureNotSupported", "keys are wrapped by encryption only")
    for unsupported in ("MacSignatureKeyInformation", "AttributeName"):
        if spec.first(unsupported) is not None:
            raise KmipError("FeatureNotSupported", "MAC/signature wrapping and wrapped attributes are not served")
    encoding = spec.first("EncodingOption")
    if encoding is not None and encoding.value != 1:
        raise KmipError("EncodingOptionError", "wrapped keys are served with No Encoding")
    info = spec.first("EncryptionKeyInformation")
    if info is None or info.type is not ItemType.STRUCTURE:
        raise KmipError("MissingData", "the Key Wrapping Specification needs an Encryption Key Information")
    wrapping = info.first("UniqueIdentifier")
    if wrapping is None or not isinstance(wrapping.value, str) or not 0 < len(wrapping.value) <= 128:
        raise KmipError("InvalidField", "the Encryption Key Information names a wrapping key")
    mode = PLAIN
    params = info.first("CryptographicParameters")
    if params is not None:
        block = params.first("BlockCipherMode") if params.type is ItemType.STRUCTURE else params
        if block is None or block.value not in WRAP_MODES:
            raise KmipError("InvalidField", "the wrapping modes served are NIST Key Wrap and AES Key Wrap Padding")
        mode = WRAP_MODES[int(block.value)]
    return WrapRequest(wrapping.value, mode)


async def get_wrapped(ops: Operations, session: Session, payload: Item, uid: str, spec: Item) -> Item:
    wrap = wrap_request(spec)
    inputs = KmipInputs(uid=uid, crypto=wrap, request_id=session.batch_id)
    record, wrapped = await ops.access(session, "kmip.get_wrapped", inputs)
    session.placeholder = uid
    mode = next(number for number, name in WRAP_MODES.items() if name == wrap.method)
    stored = Attributes.from_json(record.attributes)
    algorithm, length = stored.first("Cryptographic Algorithm"), stored.first("Cryptographic Length")
    block = t.struct_(
        "KeyBlock",
        t.enumeration("KeyFormatType", KEY_FORMAT_TYPE["Raw"] if record.object_type == "SymmetricKey" else 2),
        t.byte_string("KeyValue", wrapped),
        t.enumeration("CryptographicAlgorithm", int(algorithm.value)) if algorithm is not None else None,  # type: ignore[arg-type]
        t.integer("CryptographicLength", int(length.value)) if length is not None else None,  # type: ignore[arg-type]
        t.struct_("KeyWrappingData", t.enumeration("WrappingMethod", ENCRYPT_METHOD), t.struct_(
            "EncryptionKeyInformation", t.text("UniqueIdentifier", wrap.wrapping_uid),
            t.struct_("CryptographicParameters", t.enumeration("BlockCipherMode", mode)))),
    )  # fmt: skip
    body = t.struct_("SecretData", t.enumeration("SecretDataType", 1), block) if record.object_type == "SecretData" \
        else t.struct_("SymmetricKey", block)  # fmt: skip
    return t.struct_("ResponsePayload", t.enumeration("ObjectType", OBJECT_TYPE[record.object_type]),
                     t.text("UniqueIdentifier", uid), body)  # fmt: skip
