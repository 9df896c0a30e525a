"""The KMIP operations served: each payload read into a request of the access path, and its answer written.

Object operations go through :class:`~keysteward.access.kmip_access.KmipAccess` (policy, audit, key hierarchy);
DiscoverVersions and Query concern no object and are answered here. An operation not in :data:`SERVED`
answers Operation Not Supported. A batch item that names no Unique Identifier uses the ID Placeholder: the
identifier the previous item of the same batch created or named.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from keysteward.access.kmip_access import KmipAccess
from keysteward.access.kmip_actions import KmipInputs, KmipRecord
from keysteward.access.kmip_mac import HMAC_KEY_BITS
from keysteward.errors import KeystewardError
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import (
    CRYPTOGRAPHIC_ALGORITHM,
    OBJECT_TYPE,
    OPERATION,
    QUERY_FUNCTION,
    REVOCATION_REASON_CODE,
    STATE,
)
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.identity.principal import Principal
from keysteward.kmip import attributes as attrs
from keysteward.kmip import crypto_ops, lifecycle_ops, locate_match, mac_ops, objects, stored_keys, v2
from keysteward.kmip.errors import KmipError, from_keysteward
from keysteward.kmip.messages import SUPPORTED

VENDOR: Final = "keysteward"
AES_LENGTHS: Final = (128, 192, 256)
OBJECT_NAMES: Final = {number: name for name, number in OBJECT_TYPE.items()}
STORED_TYPES: Final = ("SymmetricKey", "SecretData", "OpaqueObject", *stored_keys.TYPES)
STATE_NAMES: Final = {number: name for name, number in STATE.items()}


@dataclass
class Session:
    who: Principal
    source: str
    version: tuple[int, int]
    placeholder: str | None = None
    batch_id: str = ""
    counts: dict[str, int] = field(default_factory=dict)


Handler = Callable[["Operations", Session, Item], Awaitable[Item]]


def _payload(*items: Item | None) -> Item:
    return t.struct_("ResponsePayload", *items)


def _enum(item: Item | None, table: dict[str, int], what: str) -> int:
    if item is None or item.type is not ItemType.ENUMERATION or not isinstance(item.value, int):
        raise KmipError("InvalidField", f"{what} is missing or not an enumeration")
    if item.value not in table.values():
        raise KmipError("InvalidField", f"{what} {item.value:#x} is not known")
    return item.value


def uid_of(session: Session, payload: Item) -> str:
    item = payload.first("UniqueIdentifier")
    if item is None:
        if session.placeholder is None:
            raise KmipError("MissingData", "no Unique Identifier and no ID placeholder")
        return session.placeholder
    if item.type is not ItemType.TEXT_STRING or not isinstance(item.value, str) or not 0 < len(item.value) <= 128:
        raise KmipError("InvalidField", "the Unique Identifier is not a short text string")
    return item.value


class Operations:
    def __init__(self, kmip: KmipAccess, max_locate_items: int) -> None:
        self.kmip = kmip
        self.max_locate_items = max_locate_items

    async def run(self, session: Session, operation: int | None, payload: Item | None) -> Item:
        handler = _SERVED.get(operation) if operation is not None else None
        if handler is None:
            raise KmipError("OperationNotSupported", "this operation is not served")
        return await handler(self, session, payload if payload is not None else t.struct_("RequestPayload"))

    async def access(self, session: Session, action: str, inputs: KmipInputs) -> Any:
        try:
            return await self.kmip.run(session.who, action, inputs, session.source)
        except KeystewardError as exc:
            raise from_keysteward(exc, session.version[0]) from None

    # -- no object ----------------------------------------------------------------------------------
    async def discover_versions(self, session: Session, payload: Item) -> Item:
        asked = []
        for item in payload.all("ProtocolVersion"):
            major, minor = item.first("ProtocolVersionMajor"), item.first("ProtocolVersionMinor")
            if major is not None and minor is not None:
                asked.append((major.value, minor.value))
        served = [v for v in SUPPORTED if not asked or v in asked]
        return _payload(*(
            t.struct_("ProtocolVersion", t.integer("ProtocolVersionMajor", a), t.integer("ProtocolVersionMinor", b))
            for a, b in served
        ))  # fmt: skip

    async def query(self, session: Session, payload: Item) -> Item:
        functions = {f.value for f in payload.all("QueryFunction")}
        out: list[Item] = []
        if QUERY_FUNCTION["QueryOperations"] in functions:
            out.extend(t.enumeration("Operation", op) for op in _SERVED)
        if QUERY_FUNCTION["QueryObjects"] in functions:
            out.extend(t.enumeration("ObjectType", OBJECT_TYPE[name]) for name in STORED_TYPES)
        if QUERY_FUNCTION["QueryServerInformation"] in functions:
            out.append(t.text("VendorIdentification", VENDOR))
            out.append(t.struct_("ServerInformation"))
        return _payload(*out)

    async def interop(self, session: Session, payload: Item) -> Item:
        """KMIP 2's test-harness markers (Begin, End, Reset of an interop case): acknowledged, nothing done."""
        return _payload()

    async def log(self, session: Session, payload: Item) -> Item:
        """KMIP 2's Log: acknowledged; the client's text is not written anywhere (it could carry anything)."""
        return _payload()

    # -- create and register ------------------------------------------------------------------------
    async def create(self, session: Session, payload: Item) -> Item:
        object_type = _enum(payload.first("ObjectType"), OBJECT_TYPE, "Object Type")
        if object_type != OBJECT_TYPE["SymmetricKey"]:
            raise KmipError("InvalidField", "Create makes symmetric keys only")
        template = _template(session, payload)
        found = {name: value for name, value in template}
        algorithm, length = found.get("Cryptographic Algorithm"), found.get("Cryptographic Length")
        if algorithm is None or length is None:
            raise KmipError("MissingData", "Create needs a Cryptographic Algorithm and a Cryptographic Length")
        _check_key_size(algorithm, length)
        assert isinstance(length.value, int)
        uid = self.kmip.new_uid()
        inputs = KmipInputs(uid=uid, object_type="SymmetricKey", template=tuple(template), size=length.value // 8,
                            request_id=session.batch_id)  # fmt: skip
        await self.access(session, "kmip.create", inputs)
        session.placeholder = uid
        return _payload(t.enumeration("ObjectType", object_type), t.text("UniqueIdentifier", uid))

    async def register(self, session: Session, payload: Item) -> Item:
        object_type = _enum(payload.first("ObjectType"), OBJECT_TYPE, "Object Type")
        name = OBJECT_NAMES[object_type]
        if name not in STORED_TYPES:
            raise KmipError("InvalidField", "Register stores keys, certificates, secret data and opaque objects")
        template = _template(session, payload)
        if name in stored_keys.TYPES:
            material, stated = stored_keys.material(payload, name)
            template = [*template, *((n, v) for n, v in stated if n not in {m for m, _ in template})]
        else:
            material = objects.material(payload, name)
            template = objects.form_attributes(payload, name, template, len(material))
        uid = self.kmip.new_uid()
        inputs = KmipInputs(uid=uid, object_type=name, template=tuple(template), material=material,
                            request_id=session.batch_id)  # fmt: skip
        await self.access(session, "kmip.register", inputs)
        session.placeholder = uid
        return _payload(t.text("UniqueIdentifier", uid))

    # -- one object ---------------------------------------------------------------------------------
    async def get(self, session: Session, payload: Item) -> Item:
        uid = uid_of(session, payload)
        fmt = payload.first("KeyFormatType")
        if fmt is not None and fmt.value not in objects.SERVED_FORMATS:
            raise KmipError("KeyFormatTypeNotSupported", "keys are served in the Raw or Transparent format")
        spec = payload.first("KeyWrappingSpecification")
        if spec is not None:
            return await lifecycle_ops.get_wrapped(self, session, payload, uid, spec)
        record, secret = await self.access(session, "kmip.get", KmipInputs(uid=uid, request_id=session.batch_id))
        session.placeholder = uid
        try:
            body = objects.object_item(record, secret, fmt.value if fmt is not None else None)  # type: ignore[arg-type]
        finally:
            secret.wipe()
        return _payload(t.enumeration("ObjectType", OBJECT_TYPE[record.object_type]), t.text("UniqueIdentifier", uid),
                        body)  # fmt: skip

    async def _record(self, session: Session, uid: str) -> KmipRecord:
        record: KmipRecord = await self.access(session, "kmip.get_attributes",
                                                KmipInputs(uid=uid, request_id=session.batch_id))  # fmt: skip
        session.placeholder = uid
        return record

    async def get_attributes(self, session: Session, payload: Item) -> Item:
        uid = uid_of(session, payload)
        if session.version[0] >= 2:
            wanted_v2 = v2.references(payload)
            record = await self._record(session, uid)
            pairs = attrs.all_attributes(record, session.version)
            return _payload(t.text("UniqueIdentifier", uid), v2.attributes(pairs, wanted_v2))
        wanted = [i.value for i in payload.all("AttributeName") if isinstance(i.value, str)]
        record = await self._record(session, uid)
        out: list[Item] = []
        for name, values in attrs.all_attributes(record, session.version):
            if not wanted or name in wanted:
                out.extend(attrs.attribute(name, index, value) for index, value in enumerate(values))
        return _payload(t.text("UniqueIdentifier", uid), *out)

    async def get_attribute_list(self, session: Session, payload: Item) -> Item:
        uid = uid_of(session, payload)
        record = await self._record(session, uid)
        names = attrs.names(record, session.version)
        if session.version[0] >= 2:
            return _payload(t.text("UniqueIdentifier", uid), *v2.attribute_references(names))
        return _payload(t.text("UniqueIdentifier", uid), *(t.text("AttributeName", n) for n in names))

    async def _change(self, session: Session, payload: Item, change: str) -> Item:
        if session.version[0] >= 2:
            return await self._change_v2(session, payload, change)
        uid = uid_of(session, payload)
        if change == "delete":
            name_item = payload.first("AttributeName")
            index_item = payload.first("AttributeIndex")
            if name_item is None or not isinstance(name_item.value, str):
                raise KmipError("MissingData", "DeleteAttribute needs an Attribute Name")
            raw_index = index_item.value if index_item is not None else 0
            if not isinstance(raw_index, int) or isinstance(raw_index, bool):
                raise KmipError("InvalidField", "Attribute Index is an integer")
            name, index, value = name_item.value, int(raw_index), None
        else:
            attribute = payload.first("Attribute")
            if attribute is None:
                raise KmipError("MissingData", "the request carries no Attribute")
            name, given, value = attrs.parse_attribute(attribute)
            index = given or 0
            attrs.settable(name, value, creating=False)
        if change == "delete":
            attrs.deletable(name)
        template = ((name, value if value is not None else t.text("AttributeValue", "")),)
        inputs = KmipInputs(uid=uid, template=template, change=change, index=index, request_id=session.batch_id)
        done_name, done_index, done_value = await self.access(session, "kmip.modify_attributes", inputs)
        session.placeholder = uid
        return _payload(t.text("UniqueIdentifier", uid), attrs.attribute(done_name, done_index, done_value))

    async def _change_v2(self, session: Session, payload: Item, change: str) -> Item:
        uid = uid_of(session, payload)
        current = None
        if payload.first("CurrentAttribute") is not None:
            current = v2.one_attribute(payload.first("CurrentAttribute"), "Current Attribute")
        if change == "delete":
            if current is None:
                names = v2.references(payload)
                if len(names) != 1:
                    raise KmipError("MissingData", "DeleteAttribute names one attribute")
                name, value = names[0], None
            else:
                name, value = current
            attrs.deletable(name)
        else:
            try:
                name, value = attrs.settable(*v2.one_attribute(payload.first("NewAttribute"), "New Attribute"),
                                             creating=False)  # fmt: skip
            except KmipError as exc:  # 2.x names the precise reason
                raise KmipError("AttributeReadOnly", exc.message) if exc.code == "kmip_read_only" else exc from None
        template = ((name, value if value is not None else t.text("AttributeValue", "")),)
        match = current[1] if current is not None else None
        inputs = KmipInputs(uid=uid, template=template, change=change, current=match, request_id=session.batch_id)
        await self.access(session, "kmip.modify_attributes", inputs)
        session.placeholder = uid
        return _payload(t.text("UniqueIdentifier", uid))

    async def set_attribute(self, session: Session, payload: Item) -> Item:
        if session.version[0] < 2:
            raise KmipError("OperationNotSupported", "SetAttribute is a KMIP 2 operation")
        return await self._change_v2(session, payload, "set")

    async def add_attribute(self, session: Session, payload: Item) -> Item:
        return await self._change(session, payload, "add")

    async def modify_attribute(self, session: Session, payload: Item) -> Item:
        return await self._change(session, payload, "modify")

    async def delete_attribute(self, session: Session, payload: Item) -> Item:
        return await self._change(session, payload, "delete")

    async def _simple(self, session: Session, payload: Item, action: str, **extra: Any) -> Item:
        uid = uid_of(session, payload)
        await self.access(session, action, KmipInputs(uid=uid, request_id=session.batch_id, **extra))
        session.placeholder = uid
        return _payload(t.text("UniqueIdentifier", uid))

    async def activate(self, session: Session, payload: Item) -> Item:
        return await self._simple(session, payload, "kmip.activate")

    async def destroy(self, session: Session, payload: Item) -> Item:
        return await self._simple(session, payload, "kmip.destroy")

    async def revoke(self, session: Session, payload: Item) -> Item:
        reason = payload.first("RevocationReason")
        if reason is None or reason.type is not ItemType.STRUCTURE:
            raise KmipError("MissingData", "Revoke needs a Revocation Reason")
        code = _enum(reason.first("RevocationReasonCode"), REVOCATION_REASON_CODE, "Revocation Reason Code")
        occurred = payload.first("CompromiseOccurrenceDate")
        date = occurred.value if occurred is not None and occurred.type is ItemType.DATE_TIME else None
        return await self._simple(session, payload, "kmip.revoke", revocation_code=code,
                                  compromise_date=date if isinstance(date, int) else None)  # fmt: skip

    async def locate(self, session: Session, payload: Item) -> Item:
        maximum, offset = payload.first("MaximumItems"), payload.first("OffsetItems")
        limit = self.max_locate_items
        if maximum is not None and isinstance(maximum.value, int) and maximum.value >= 0:
            limit = min(limit, maximum.value)
        skip = offset.value if offset is not None and isinstance(offset.value, int) and offset.value > 0 else 0
        filters: dict[str, Any] = {}
        others: list[tuple[str, Item]] = []
        given: list[tuple[str, Item | None]] = []
        for item in payload.all("Attribute"):
            name, _, maybe = attrs.parse_attribute(item)
            given.append((name, maybe))
        for holder in payload.all("Attributes"):
            given.extend(v2.to_value(item) for item in holder.items)
        for name, value in given:
            if value is None:
                raise KmipError("InvalidField", f"attribute '{name[:64]}' has no value")
            if name == "Object Type":
                filters["object_type"] = OBJECT_NAMES.get(_enum(value, OBJECT_TYPE, "Object Type"), "")
            elif name == "State":
                filters["state"] = STATE_NAMES[_enum(value, STATE, "State")]
            else:
                others.append((name, value))
        filters["match"] = locate_match.matcher(others)
        found = await self.access(session, "kmip.locate", KmipInputs(locate=filters, request_id=session.batch_id))
        page = found[skip : skip + limit]
        paged = maximum is not None or offset is not None
        located = t.integer("LocatedItems", len(found)) if session.version >= (1, 3) and paged else None
        return _payload(located, *(t.text("UniqueIdentifier", r.uid) for r in page))


def _check_key_size(algorithm: Item, length: Item) -> None:
    """A Create's algorithm and length: AES of 128, 192 or 256 bits, or an HMAC key of the lengths it takes."""
    if not isinstance(length.value, int) or length.value % 8:
        raise KmipError("InvalidField", "the Cryptographic Length is a whole number of bytes")
    if algorithm.value == CRYPTOGRAPHIC_ALGORITHM["Aes"]:
        if length.value not in AES_LENGTHS:
            raise KmipError("InvalidField", "Create makes AES keys of 128, 192 or 256 bits")
    elif isinstance(algorithm.value, int) and algorithm.value in HMAC_KEY_BITS:
        low, high = HMAC_KEY_BITS[algorithm.value]
        if not low <= length.value <= high:
            raise KmipError("InvalidField", f"this HMAC key is {low} to {high} bits")
    else:
        raise KmipError("InvalidField", "Create makes AES and HMAC-SHA256/384/512 keys")


def _template(session: Session, payload: Item) -> list[tuple[str, Item]]:
    return v2.template(payload) if session.version[0] >= 2 else attrs.template(payload)


_SERVED: dict[int, Handler] = {
    OPERATION["DiscoverVersions"]: Operations.discover_versions,
    OPERATION["Query"]: Operations.query,
    OPERATION["Interop"]: Operations.interop,
    OPERATION["Log"]: Operations.log,
    OPERATION["Create"]: Operations.create,
    OPERATION["Register"]: Operations.register,
    OPERATION["Get"]: Operations.get,
    OPERATION["GetAttributes"]: Operations.get_attributes,
    OPERATION["GetAttributeList"]: Operations.get_attribute_list,
    OPERATION["AddAttribute"]: Operations.add_attribute,
    OPERATION["ModifyAttribute"]: Operations.modify_attribute,
    OPERATION["DeleteAttribute"]: Operations.delete_attribute,
    OPERATION["SetAttribute"]: Operations.set_attribute,
    OPERATION["Activate"]: Operations.activate,
    OPERATION["Revoke"]: Operations.revoke,
    OPERATION["Destroy"]: Operations.destroy,
    OPERATION["Locate"]: Operations.locate,
    OPERATION["Encrypt"]: crypto_ops.encrypt,
    OPERATION["Decrypt"]: crypto_ops.decrypt,
    OPERATION["Mac"]: mac_ops.mac,
    OPERATION["MacVerify"]: mac_ops.mac_verify,
    OPERATION["RngRetrieve"]: mac_ops.rng_retrieve,
    OPERATION["RngSeed"]: mac_ops.rng_seed,
    OPERATION["Check"]: lifecycle_ops.check,
    OPERATION["Rekey"]: lifecycle_ops.rekey,
    OPERATION["AdjustAttribute"]: lifecycle_ops.adjust_attribute,
}
