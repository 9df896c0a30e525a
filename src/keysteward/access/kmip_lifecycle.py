"""KMIP Check, ReKey and AdjustAttribute as actions of the access path.

- ``kmip.check`` (Cedar ``kmip_get_attributes``: it reads attributes, no material): the object exists, is not
  destroyed, its Cryptographic Usage Mask holds every bit asked, a Lease Time asked is not longer than the
  server's, a Usage Limits Count asked is within the object's Usage Limits (keysteward sets none: any passes).
  A failed check is refused with ``kmip_check_failed`` and audited; nothing changes either way.
- ``kmip.rekey`` (Cedar ``kmip_rekey`` on the existing key): a new symmetric key with fresh material of the
  existing key's algorithm and length, its attributes copied (the client's template overrides them), its
  Names moved from the existing key (KMIP: the name follows the current key), Link Replaced Object on the new
  key and Link Replacement Object on the existing one. With an Offset the new key's Activation Date is its
  Initial Date plus the Offset and its other dates keep their distance; without one they are copied. The new
  key is Active when its Activation Date is now or past, else Pre-Active; the existing key's state is
  unchanged. A destroyed key is not rekeyed.
- ``kmip.adjust_attribute`` (Cedar ``kmip_modify_attributes``; KMIP 2.x): Increment or Decrement a client
  attribute of a number or date type by the Adjustment Value, or Negate a number or a boolean.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection

from keysteward.access.actions import ActionTable, Subject
from keysteward.access.kmip_actions import KmipCreate, KmipInputs, KmipModifyAttributes, _KmipAction, _State
from keysteward.access.kmip_attributes import SERVER_SET, Attributes, value_item
from keysteward.errors import Denied
from keysteward.formats.kmip_enums import LINK_TYPE
from keysteward.formats.kmip_tags import TAGS
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.keys.kmip_objects import KmipObjects

LEASE_TIME: Final = 3600
"""Seconds: the Lease Time every object states (kmip/attributes.py answers the same value)."""
_DATES: Final = ("Activation Date", "Deactivation Date", "Process Start Date", "Protect Stop Date")
_GONE: Final = ("Destroyed", "DestroyedCompromised")
_NUMBERS: Final = (ItemType.INTEGER, ItemType.LONG_INTEGER, ItemType.INTERVAL, ItemType.DATE_TIME)
_LIMITS: Final = {ItemType.INTEGER: (-(2**31), 2**31 - 1), ItemType.INTERVAL: (0, 2**32 - 1)}


@dataclass(frozen=True)
class CheckRequest:
    usage_limits_count: int | None = None
    usage_mask: int | None = None
    lease_time: int | None = None


@dataclass(frozen=True)
class ReKeyRequest:
    new_uid: str
    offset: int | None = None
    template: tuple[tuple[str, Item], ...] = ()


@dataclass(frozen=True)
class AdjustRequest:
    name: str
    adjustment: str
    """``increment``, ``decrement`` or ``negate``."""
    amount: Item | None = None


def _refuse(code: str, message: str) -> Denied:
    return Denied(message, code=code)


class KmipCheck(_KmipAction):
    action, cedar_action = "kmip.check", "kmip_get_attributes"

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        record, request = state.record, state.inputs.crypto
        assert record is not None and isinstance(request, CheckRequest)
        if record.state in _GONE:
            raise _refuse("kmip_wrong_state", "the object was destroyed")
        mask = Attributes.from_json(record.attributes).first("Cryptographic Usage Mask")
        held = mask.value if mask is not None and isinstance(mask.value, int) else 0
        if request.usage_mask is not None and request.usage_mask & ~held:
            subject.details["failed"] = "Cryptographic Usage Mask"
            raise _refuse("kmip_check_failed", "Check failed: the usage mask does not allow it")
        if request.lease_time is not None and request.lease_time > LEASE_TIME:
            subject.details["failed"] = "Lease Time"
            raise _refuse("kmip_check_lease", f"Check failed: the lease is at most {LEASE_TIME} s")
        return record.uid


def _link(kind: str, uid: str) -> Item:
    return Item(TAGS["AttributeValue"], ItemType.STRUCTURE, (
        Item(TAGS["LinkType"], ItemType.ENUMERATION, LINK_TYPE[kind]),
        Item(TAGS["LinkedObjectIdentifier"], ItemType.TEXT_STRING, uid),
    ))  # fmt: skip


def _new_attributes(old: Attributes, request: ReKeyRequest, now: datetime) -> list[tuple[str, Item]]:
    copied = {name: list(values) for name, values in old.values.items() if name not in SERVER_SET and values}
    copied.pop("Link", None)
    if request.offset is not None:
        activation = old.first("Activation Date")
        shift = None
        if activation is not None and isinstance(activation.value, int):
            shift = int(now.timestamp()) + request.offset - activation.value
        for name in _DATES:
            value = copied.get(name, [None])[0]
            if name == "Activation Date":
                copied[name] = [value_item(ItemType.DATE_TIME, int(now.timestamp()) + request.offset)]
            elif value is not None and isinstance(value.value, int) and shift is not None:
                copied[name] = [value_item(ItemType.DATE_TIME, value.value + shift)]
            else:
                copied.pop(name, None)
    for name, value in request.template:
        copied[name] = [value]
    pairs = [(name, value) for name, values in copied.items() for value in values]
    return [*pairs, ("Link", _link("ReplacedObjectLink", ""))]


class KmipReKey(_KmipAction):
    action, cedar_action = "kmip.rekey", "kmip_rekey"

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        record, request = state.record, state.inputs.crypto
        assert record is not None and isinstance(request, ReKeyRequest)
        if record.state in _GONE:
            raise _refuse("kmip_wrong_state", "a destroyed key is not rekeyed")
        old = Attributes.from_json(record.attributes)
        length = old.first("Cryptographic Length")
        if record.object_type != "SymmetricKey" or length is None or not isinstance(length.value, int):
            raise _refuse("kmip_invalid_field", "ReKey renews symmetric keys")
        pairs = _new_attributes(old, request, now)
        pairs[-1] = ("Link", _link("ReplacedObjectLink", record.uid))
        inputs = KmipInputs(uid=request.new_uid, object_type="SymmetricKey", template=tuple(pairs),
                            size=length.value // 8, request_id=state.inputs.request_id)  # fmt: skip
        KmipCreate(self.objects).apply(conn, subject, _State(inputs, principal=state.principal), now)
        old.values.pop("Name", None)
        old.add("Link", _link("ReplacementObjectLink", request.new_uid))
        old.set("Last Change Date", value_item(ItemType.DATE_TIME, int(now.timestamp())))
        record.attributes, record.name = old.to_json(), None
        self.objects.save(conn, record, now)
        subject.details["replacement"] = request.new_uid
        return request.new_uid


class KmipAdjust(KmipModifyAttributes):
    action = "kmip.adjust_attribute"

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        record, request = state.record, state.inputs.crypto
        assert record is not None and isinstance(request, AdjustRequest)
        current = Attributes.from_json(record.attributes).first(request.name)
        if current is None:
            raise _refuse("kmip_attribute_not_found", f"the object has no '{request.name[:64]}'")
        value = _adjusted(current, request)
        adjusted = KmipInputs(uid=record.uid, template=((request.name, value),), change="set",
                              request_id=state.inputs.request_id)  # fmt: skip
        return super().apply(conn, subject, _State(adjusted, record), now)


def _adjusted(current: Item, request: AdjustRequest) -> Item:
    kind, value = current.type, current.value
    if request.adjustment == "negate":
        if kind is ItemType.BOOLEAN:
            return value_item(kind, not value)
        if kind in (ItemType.INTEGER, ItemType.LONG_INTEGER) and isinstance(value, int):
            return _bounded(kind, -value)
        raise _refuse("kmip_invalid_field", "Negate applies to a number or a boolean")
    if kind not in _NUMBERS or not isinstance(value, int) or isinstance(value, bool):
        raise _refuse("kmip_invalid_field", "Increment and Decrement apply to a number or a date")
    amount = request.amount
    step = 1 if amount is None else amount.value
    if amount is not None and (amount.type not in _NUMBERS or not isinstance(step, int) or isinstance(step, bool)):
        raise _refuse("kmip_invalid_field", "the Adjustment Value is a number")
    assert isinstance(step, int)
    return _bounded(kind, value + step if request.adjustment == "increment" else value - step)


def _bounded(kind: ItemType, value: int) -> Item:
    low, high = _LIMITS.get(kind, (-(2**63), 2**63 - 1))
    if not low <= value <= high:
        raise _refuse("kmip_invalid_field", "the adjusted value is out of its type's range")
    return value_item(kind, value)


def register(table: ActionTable, objects: KmipObjects) -> None:
    for handler in (KmipCheck, KmipReKey, KmipAdjust):
        table.register(handler(objects))
