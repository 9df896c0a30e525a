"""KMIP operations on managed objects as actions of the access path, and the facade the KMIP front-end calls.

Each operation is one action (``kmip.create``, ``kmip.get``, ``kmip.destroy``...) decided by the tenant's Cedar
policy (actions ``kmip_*`` on ``KmipObject::"tenant/uid"``, ``kmip_locate`` on the tenant) for a ``Hypervisor``
principal (a client certificate of role ``hypervisor``). The object is loaded in ``resolve`` (scoped to the
caller's tenant: another tenant's identifier is not found, and audited so), re-read in the transaction with
the audit record, where its state change is written (``book``). Get delivers the material in the channel
(:attr:`Delivery.CHANNEL`) after the commit only: a denial never unwraps. Refusals in the transaction are
:class:`~keysteward.errors.Denied` with a ``kmip_*`` code the front-end turns into a KMIP Result Reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Refusal, Subject
from keysteward.access.kmip_attributes import Attributes, check_export, initial_state, parsed, value_item
from keysteward.access.principals import policy_principal
from keysteward.access.request import AccessRequest, Delivery
from keysteward.crypto.secret import SecretBuffer
from keysteward.errors import Conflict, Denied, KeystewardError, NotFound
from keysteward.formats.kmip_enums import HASHING_ALGORITHM, KEY_FORMAT_TYPE, REVOCATION_REASON_CODE
from keysteward.formats.kmip_tags import TAGS
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.identity.principal import Principal
from keysteward.keys.kmip_objects import KmipObjects, KmipRecord, Wrapped
from keysteward.lru import Lru
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.facts import PolicyRequest

__all__ = ["KmipInputs", "KmipRecord", "register"]
_RECENT_FACTS: Lru[tuple[Any, ...], PolicyRequest] = Lru(1024)
"""A second's facts per caller and object; an entry holds its platform facts object, so that id stays unique."""
_COMPROMISE = (REVOCATION_REASON_CODE["KeyCompromise"], REVOCATION_REASON_CODE["CaCompromise"])


@dataclass(frozen=True, repr=False)
class KmipInputs:
    uid: str = ""
    object_type: str = ""
    template: tuple[tuple[str, Item], ...] = ()
    """Create/Register: the client's attributes; Add/Modify/Delete: the one attribute (name, value)."""
    size: int = 0
    """Create: bytes of fresh material."""
    material: bytes | None = None
    """Register: the client's key material."""
    change: str = ""
    """Add/Modify/Delete attribute: ``add``, ``modify``, ``delete``, ``set``."""
    index: int = 0
    current: Item | None = None
    """KMIP 2 Modify/Delete: the value to change, instead of an index."""
    revocation_code: int = 0
    compromise_date: int | None = None
    locate: dict[str, Any] = field(default_factory=dict)
    """Locate: ``object_type``, ``state``, ``name``, ``match`` (a predicate on a record)."""
    request_id: str = ""
    crypto: Any = None
    """Encrypt/Decrypt: the :class:`~keysteward.access.kmip_crypto.CryptoRequest`."""


def _refuse(code: str, message: str) -> Denied:
    return Denied(message, code=code)


def _platform(objects: KmipObjects, request: AccessRequest) -> dict[str, Any]:
    """The hypervisor's latest verified TPM quote's facts (one object while they stay the same)."""
    who = request.principal
    assert who is not None
    return objects.platform_of(who.tenant_id, f"{who.role}:{who.name}")


def _facts(
    objects: KmipObjects,
    request: AccessRequest,
    cedar_action: str,
    now: datetime,
    resource: dict[str, Any],
    platform: dict[str, Any] | None = None,
) -> PolicyRequest:
    """The policy request: the hypervisor's latest verified TPM quote is ``context.platform``."""
    assert request.principal is not None
    return PolicyRequest(
        tenant=request.tenant,
        action=cedar_action,
        principal=policy_principal(request.principal),
        resource=resource,
        identity={},
        platform=_platform(objects, request) if platform is None else platform,
        time=now,
        source_ip=request.context.address(),
    )


def _object_resource(uid: str, object_type: str, state: str, attributes: Attributes) -> dict[str, Any]:
    return {"type": "KmipObject", "uid": uid, "object_type": object_type, "state": state, "labels": attributes.tags()}


@dataclass
class _State:
    inputs: KmipInputs
    record: KmipRecord | None = None
    result: Any = None
    wrapped: Wrapped | None = None
    principal: Principal | None = None


class _KmipAction(ActionHandler):
    delivery = Delivery.NOTHING
    needs_object = True
    warm_delivery = False
    """Whether neither ``perform`` nor what is delivered after the commit reads the database: then a request
    on a recently read object is decided on the event loop, without a thread (each handler says so itself)."""

    def __init__(self, objects: KmipObjects) -> None:
        self.objects = objects

    def _details(self, request: AccessRequest, attributes: Attributes | None) -> dict[str, Any]:
        details: dict[str, Any] = {"front_end": "kmip"}
        if request.context.source:
            details["source"] = request.context.source[:64]
        if request.context.request_id:
            details["batch_item"] = request.context.request_id[:64]
        if attributes is not None:
            details.update(attributes.audited())
        return details

    def warm(self, request: AccessRequest, tenant_id: str) -> bool:
        inputs: KmipInputs = request.inputs
        who = request.principal
        return (
            self.warm_delivery
            and who is not None
            and (not self.needs_object or self.objects.recent(tenant_id, inputs.uid) is not None)
            and self.objects.platform_warm(tenant_id, f"{who.role}:{who.name}")
        )

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        if request.principal is None:
            raise Denied("a KMIP operation needs a client certificate", code="no_credentials")
        policy_principal(request.principal)  # only machine certificates with a policy principal
        inputs: KmipInputs = request.inputs
        actor, target = request.principal.describe(), f"kmip:{inputs.uid[:64]}"
        state = _State(inputs, principal=request.principal)
        if not self.needs_object:
            return self.resolve_new(request, tenant_id, now, Subject(tenant_id, actor, target, None, state=state))
        record = self.objects.lookup(tenant_id, inputs.uid)
        if record is None:
            details = self._details(request, None)
            denied = _refuse("kmip_not_found", "no such object")

            def effect(conn: Connection) -> dict[str, Any]:
                return {"actor": actor, "action": self.action, "target": target, "outcome": "denied",
                        "reason": denied.code, "details": details}  # fmt: skip

            raise Refusal(tenant_id, denied, effect)
        state.record = record
        text = record.attributes
        attributes = parsed(text)  # shared: only read here
        assert self.cedar_action is not None
        cedar_action, platform = self.cedar_action, _platform(self.objects, request)
        # the facts hold the time to the second: the same caller asking the same of the same object (same
        # stored record, same platform facts object: a new quote is a new object) within a second from the same
        # address gets the same immutable request, and the policy engine's cached decision for it
        recent = (tenant_id, actor, cedar_action, record.uid, record.object_type, record.state, text,
                  request.context.source, int(now.timestamp()), id(platform))  # fmt: skip
        facts = _RECENT_FACTS.get_or_make(recent, lambda: _facts(self.objects, request, cedar_action, now,
            _object_resource(record.uid, record.object_type, record.state, attributes), platform))  # fmt: skip
        return Subject(tenant_id, actor, target, facts, details=self._details(request, attributes), state=state)

    def resolve_new(self, request: AccessRequest, tenant_id: str, now: datetime, subject: Subject) -> Subject:
        raise NotImplementedError

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        if decision.effect == "approval":
            raise _refuse("approval_unsupported", "KMIP operations are not held for approval")
        state: _State = subject.state
        if self.needs_object:
            assert state.record is not None
            # as of this transaction, as it was decided on (Stale otherwise), with its wrapped material
            record, state.wrapped = self.objects.current(conn, state.record)
            if record is None:
                raise _refuse("kmip_not_found", "no such object")
            state.record = record
        state.result = self.apply(conn, subject, state, now)
        return Booked(value=state.result)

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        """The state change, in the transaction with the audit record (raise Denied to refuse)."""
        return state.record


def _digest(value: bytes) -> Item:
    sha256 = Item(TAGS["HashingAlgorithm"], ItemType.ENUMERATION, HASHING_ALGORITHM["Sha256"])
    raw = Item(TAGS["KeyFormatType"], ItemType.ENUMERATION, KEY_FORMAT_TYPE["Raw"])
    return Item(TAGS["AttributeValue"], ItemType.STRUCTURE, (sha256, Item(TAGS["DigestValue"], ItemType.BYTE_STRING,
                                                                            value), raw))  # fmt: skip


def _set_dates(attributes: Attributes, now: datetime, *names: str) -> None:
    for name in names:
        attributes.set(name, value_item(ItemType.DATE_TIME, int(now.timestamp())))


class KmipCreate(_KmipAction):
    """Create (fresh material of ``size`` bytes) and Register (the client's ``material``)."""

    action, cedar_action = "kmip.create", "kmip_create"
    needs_object = False
    warm_delivery = True  # resolving reads nothing; the material is made and stored in the transaction

    def resolve_new(self, request: AccessRequest, tenant_id: str, now: datetime, subject: Subject) -> Subject:
        assert request.principal is not None
        inputs: KmipInputs = request.inputs
        attributes = Attributes({})
        for name, value in inputs.template:
            attributes.add(name, value)
        resource = _object_resource(inputs.uid, inputs.object_type, "PreActive", attributes)
        assert self.cedar_action is not None
        subject.facts = _facts(self.objects, request, self.cedar_action, now, resource)
        subject.details.update(self._details(request, attributes), object_type=inputs.object_type)
        return subject

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        inputs = state.inputs
        attributes = Attributes({})
        for name, value in inputs.template:
            attributes.add(name, value)
        _set_dates(attributes, now, "Initial Date", "Last Change Date")
        if self.action == "kmip.create":  # the operating system's generator made it: RNG Algorithm Unspecified
            rng = Item(TAGS["RngAlgorithm"], ItemType.ENUMERATION, 1)
            attributes.set("Random Number Generator", Item(TAGS["AttributeValue"], ItemType.STRUCTURE, (rng,)))
        record = KmipRecord(
            inputs.uid, subject.tenant_id, inputs.object_type, initial_state(attributes, now),
            attributes.name_value(), None, "", subject.actor[:200], now, now, None,
        )  # fmt: skip
        state.record = record
        if inputs.size or inputs.material is not None:  # the KEK is made once a Create or Register is permitted
            assert state.principal is not None
            self.objects.ensure_kek(conn, subject.tenant_id, state.principal)

        def describe(digest: bytes) -> str:
            if inputs.object_type == "SymmetricKey" and digest:  # never of secret data: a hash is a guess test
                attributes.set("Digest", _digest(digest))
            return attributes.to_json()

        subject.details["kek_version"] = self.objects.insert(
            conn, record, size=inputs.size, material=inputs.material, describe=describe
        )
        return inputs.uid


class KmipRegister(KmipCreate):
    action, cedar_action = "kmip.register", "kmip_register"


class KmipGet(_KmipAction):
    """Get: the material's wrapped row is read in the transaction that decided it, and unwrapped after the
    commit with the cached KEK. Material shredded, or a KEK disabled or destroyed, is found in the transaction
    and refused there, so the audit record says so (it once said ``ok`` for a Get refused at delivery)."""

    action, cedar_action = "kmip.get", "kmip_get"
    delivery = Delivery.CHANNEL
    warm_delivery = True  # the material is unwrapped with the cached KEK (see warm)
    writes = False  # the only write is last_get_at, at most hourly, and nothing after it can fail

    def warm(self, request: AccessRequest, tenant_id: str) -> bool:
        inputs: KmipInputs = request.inputs
        kek = self.objects.recent_kek(tenant_id, inputs.uid)
        return kek is not None and super().warm(request, tenant_id) and self.objects.keys.is_warm(
            tenant_id, key_id=kek[0], version=kek[1])  # fmt: skip

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        record = state.record
        assert record is not None
        if record.state in ("Destroyed", "DestroyedCompromised"):
            raise _refuse("kmip_destroyed", "the object was destroyed")
        check_export(record.attributes, wrapped=self.delivery is Delivery.OPERATION)
        if state.wrapped is not None:  # what would stop its delivery is a refusal, audited as one
            try:
                self.objects.openable(subject.tenant_id, state.wrapped)
            except (Conflict, NotFound) as exc:
                raise _refuse(exc.code or "kmip_no_material", exc.message) from None
        self.objects.fetched(conn, record, now)
        return record, state.wrapped

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> tuple[KmipRecord, SecretBuffer]:
        record, wrapped = booked.value
        if wrapped is None:
            raise Conflict("this object has no material", code="kmip_no_material")
        return record, self.objects.open(subject.tenant_id, wrapped)


class KmipGetAttributes(_KmipAction):
    """GetAttributes and GetAttributeList: the record, no material."""

    warm_delivery = True
    writes = False  # reads only: no savepoint
    action, cedar_action = "kmip.get_attributes", "kmip_get_attributes"


class KmipModifyAttributes(_KmipAction):
    """AddAttribute, ModifyAttribute, DeleteAttribute (and 2.x SetAttribute): one attribute of one object."""

    warm_delivery = True
    action, cedar_action = "kmip.modify_attributes", "kmip_modify_attributes"

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        record, inputs = state.record, state.inputs
        assert record is not None and len(inputs.template) == 1
        if record.state in ("Destroyed", "DestroyedCompromised"):
            raise _refuse("kmip_wrong_state", "the object was destroyed")
        name, value = inputs.template[0]
        if name in ("Activation Date", "Cryptographic Usage Mask") and record.state != "PreActive":
            raise _refuse("kmip_wrong_state", f"'{name}' changes only while the object is pre-active")
        attributes = Attributes.copy_of(record.attributes)
        index = inputs.index
        if inputs.current is not None:
            held = attributes.values.get(name, [])
            found = [n for n, v in enumerate(held) if v.type is inputs.current.type and v.value == inputs.current.value]
            index = found[0] if found else len(held)  # no such value: not found below
        try:
            if inputs.change == "add":
                index = attributes.add(name, value)
            elif inputs.change == "modify":
                attributes.modify(name, index, value)
            elif inputs.change == "set":
                attributes.set(name, value)
            else:
                value = attributes.delete(name, index)
        except KeystewardError as exc:  # the attribute rules' Conflict: a refusal in the transaction
            raise _refuse(exc.code or "kmip_invalid_field", exc.message) from None
        _set_dates(attributes, now, "Last Change Date")
        record.attributes, record.name = attributes.to_json(), attributes.name_value()
        self.objects.save(conn, record, now)
        subject.details.update(attributes.audited(), attribute=name[:64], change=inputs.change)
        return name, index, value


class KmipLocate(_KmipAction):
    writes = False  # reads only (after the commit): no savepoint
    reads_many = True  # every candidate object of the tenant: in a thread, never on a loop
    action, cedar_action = "kmip.locate", "kmip_locate"
    needs_object = False

    def resolve_new(self, request: AccessRequest, tenant_id: str, now: datetime, subject: Subject) -> Subject:
        inputs: KmipInputs = request.inputs
        subject.target = "kmip:*"
        subject.facts = _facts(self.objects, request, "kmip_locate", now, {"type": "Tenant"})
        filters = {k: str(v)[:64] for k, v in inputs.locate.items() if k in ("object_type", "state", "name") and v}
        subject.details.update(self._details(request, None), **filters)
        return subject

    def apply(self, conn: Connection, subject: Subject, state: _State, now: datetime) -> Any:
        return None

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> list[KmipRecord]:
        locate = subject.state.inputs.locate
        records = self.objects.candidates(
            subject.tenant_id, object_type=locate.get("object_type"), state=locate.get("state"), name=locate.get("name")
        )
        match: Callable[[KmipRecord], bool] | None = locate.get("match")
        if locate.get("state") is None:  # destroyed objects (no material left) only when their state is asked
            records = [r for r in records if r.state not in ("Destroyed", "DestroyedCompromised")]
        return [r for r in records if match is None or match(r)]


_HANDLERS: tuple[type[_KmipAction], ...] = (
    KmipCreate, KmipRegister, KmipGet, KmipGetAttributes, KmipModifyAttributes, KmipLocate,
)  # fmt: skip


def register(table: ActionTable, objects: KmipObjects) -> None:
    for handler in _HANDLERS:
        table.register(handler(objects))
