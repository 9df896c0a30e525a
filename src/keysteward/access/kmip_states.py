"""KMIP state changes of a managed object as actions of the access path: Activate (``kmip.activate``), Revoke
(``kmip.revoke``: Deactivated, or Compromised with a compromise reason) and Destroy (``kmip.destroy``: the
material crypto-shredded in the transaction with the audit record). KMIP's object state machine: only a
Pre-Active object is activated, an Active one is revoked before it is destroyed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.actions import ActionTable, Booked, Subject
from keysteward.access.kmip_actions import _KmipAction, _refuse, _set_dates, _State
from keysteward.access.kmip_attributes import Attributes, value_item
from keysteward.formats.kmip_enums import REVOCATION_REASON_CODE
from keysteward.formats.kmip_tags import TAGS
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.keys.kmip_objects import KmipObjects

_COMPROMISE = (REVOCATION_REASON_CODE["KeyCompromise"], REVOCATION_REASON_CODE["CaCompromise"])


class KmipActivate(_KmipAction):
    warm_delivery = True
    action, cedar_action = "kmip.activate", "kmip_activate"

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        record = state.record
        assert record is not None
        if record.state != "PreActive":
            raise _refuse("kmip_wrong_state", f"only a pre-active object is activated, not a {record.state} one")
        attributes = Attributes.copy_of(record.attributes)
        _set_dates(attributes, now, "Activation Date", "Last Change Date")
        record.state, record.attributes = "Active", attributes.to_json()
        self.objects.save(conn, record, now)
        return record.uid


class KmipRevoke(_KmipAction):
    warm_delivery = True
    action, cedar_action = "kmip.revoke", "kmip_revoke"

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        record, inputs = state.record, state.inputs
        assert record is not None
        if record.state in ("Destroyed", "DestroyedCompromised"):
            raise _refuse("kmip_wrong_state", "the object was destroyed")
        attributes = Attributes.copy_of(record.attributes)
        code = Item(TAGS["RevocationReasonCode"], ItemType.ENUMERATION, inputs.revocation_code)
        reason = Item(TAGS["AttributeValue"], ItemType.STRUCTURE, (code,))
        attributes.set("Revocation Reason", reason)
        if inputs.revocation_code in _COMPROMISE:
            record.state = "Compromised"
            _set_dates(attributes, now, "Compromise Date")
            occurred = inputs.compromise_date if inputs.compromise_date is not None else int(now.timestamp())
            attributes.set("Compromise Occurrence Date", value_item(ItemType.DATE_TIME, occurred))
        elif record.state in ("PreActive", "Active"):
            record.state = "Deactivated"
            _set_dates(attributes, now, "Deactivation Date")
        _set_dates(attributes, now, "Last Change Date")
        record.attributes = attributes.to_json()
        self.objects.save(conn, record, now)
        subject.details["revocation_reason"] = inputs.revocation_code
        return record.uid


class KmipDestroy(_KmipAction):
    action, cedar_action = "kmip.destroy", "kmip_destroy"

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        record = state.record
        assert record is not None
        if record.state == "Active":
            raise _refuse("kmip_wrong_state", "an active object is revoked before it is destroyed")
        if record.state in ("Destroyed", "DestroyedCompromised"):
            raise _refuse("kmip_destroyed", "the object was destroyed already")
        self.objects.shred(conn, record)
        attributes = Attributes.copy_of(record.attributes)
        _set_dates(attributes, now, "Destroy Date", "Last Change Date")
        record.state = "DestroyedCompromised" if record.state == "Compromised" else "Destroyed"
        record.attributes = attributes.to_json()
        self.objects.save(conn, record, now)
        return record.uid

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> Any:
        self.objects.after_shred()
        return booked.value


def register(table: ActionTable, objects: KmipObjects) -> None:
    for handler in (KmipActivate, KmipRevoke, KmipDestroy):
        table.register(handler(objects))
