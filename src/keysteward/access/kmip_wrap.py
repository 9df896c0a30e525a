"""KMIP Get in a key-wrapped format, as the access-path action ``kmip.get_wrapped``.

The object is decided like a Get (Cedar ``kmip_get`` on it) and the wrapping key too (Cedar ``kmip_wrap`` on
that ``KmipObject``): both must be permitted. The wrapping key must be an Active AES key whose Cryptographic
Usage Mask, when it has one, allows Wrap Key. The delivery is :attr:`Delivery.OPERATION`: after the permit
both keys are unwrapped from the tenant's KEK, the object's material is wrapped with AES Key Wrap (RFC 3394,
Block Cipher Mode NIST Key Wrap) or AES Key Wrap with Padding (RFC 5649), both plaintexts are wiped, and
only the wrapped bytes leave. RFC 3394 needs material of a multiple of 8 bytes, at least 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cryptography.hazmat.primitives.keywrap import aes_key_wrap, aes_key_wrap_with_padding

from keysteward.access.actions import ActionTable, Refusal, Subject
from keysteward.access.kmip_actions import KmipGet, _facts, _object_resource
from keysteward.access.kmip_attributes import Attributes
from keysteward.access.request import AccessRequest, Delivery
from keysteward.errors import BadRequest, Conflict, Denied
from keysteward.formats.kmip_enums import CRYPTOGRAPHIC_ALGORITHM, CRYPTOGRAPHIC_USAGE_MASK
from keysteward.keys.kmip_objects import KmipObjects, KmipRecord

PADDED: Final = "RFC5649"
PLAIN: Final = "RFC3394"


@dataclass(frozen=True)
class WrapRequest:
    wrapping_uid: str
    method: str
    """:data:`PLAIN` (RFC 3394) or :data:`PADDED` (RFC 5649)."""


class KmipGetWrapped(KmipGet):
    action, cedar_action = "kmip.get_wrapped", "kmip_get"
    delivery = Delivery.OPERATION
    warm_delivery = False  # perform reads both wrapped keys

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        subject = super().resolve(request, tenant_id, now)
        wrap: WrapRequest = request.inputs.crypto
        wrapping = self.objects.get(tenant_id, wrap.wrapping_uid)
        if wrapping is None:
            denied = Denied("no such wrapping key", code="kmip_wrapping_not_found")
            details = {**subject.details, "wrapping_key": wrap.wrapping_uid[:64]}
            record = {"actor": subject.actor, "action": self.action, "target": subject.target, "outcome": "denied",
                      "reason": denied.code, "details": details}  # fmt: skip
            raise Refusal(tenant_id, denied, lambda conn: record)
        attributes = Attributes.from_json(wrapping.attributes)
        resource = _object_resource(wrapping.uid, wrapping.object_type, wrapping.state, attributes)
        subject.more_facts = (_facts(self.objects, request, "kmip_wrap", now, resource),)
        subject.details.update(wrapping_key=wrapping.uid, wrap=wrap.method)
        subject.state.result = wrapping  # until book() puts its own result there, after perform()
        return subject

    def perform(self, subject: Subject) -> Any:
        record: KmipRecord = subject.state.record
        wrapping: KmipRecord = subject.state.result
        wrap: WrapRequest = subject.state.inputs.crypto
        if record.state in ("Destroyed", "DestroyedCompromised"):
            raise Conflict("the object was destroyed", code="kmip_destroyed")
        if record.object_type not in ("SymmetricKey", "SecretData"):
            raise BadRequest("only keys and secret data are wrapped", code="kmip_invalid_field")
        if wrapping.state != "Active":
            raise Conflict(f"the wrapping key is {wrapping.state}, not Active", code="kmip_wrong_state")
        held = Attributes.from_json(wrapping.attributes)
        algorithm, mask = held.first("Cryptographic Algorithm"), held.first("Cryptographic Usage Mask")
        if (
            wrapping.object_type != "SymmetricKey"
            or algorithm is None
            or algorithm.value != CRYPTOGRAPHIC_ALGORITHM["Aes"]
        ):
            raise BadRequest("the wrapping key is an AES key", code="kmip_invalid_field")
        if mask is not None and isinstance(mask.value, int) and not mask.value & CRYPTOGRAPHIC_USAGE_MASK["WrapKey"]:
            raise Conflict("the wrapping key's usage mask does not allow Wrap Key", code="kmip_usage_mask")
        kek = self.objects.material(wrapping)  # the bytes() copies below are transient, as in any primitive
        try:
            secret = self.objects.material(record)
            try:
                if wrap.method == PADDED:
                    wrapped = aes_key_wrap_with_padding(bytes(kek.view()), bytes(secret.view()))
                elif len(secret.view()) % 8 or len(secret.view()) < 16:
                    raise BadRequest("RFC 3394 wraps multiples of 8 bytes, at least 16", code="kmip_invalid_field")
                else:
                    wrapped = aes_key_wrap(bytes(kek.view()), bytes(secret.view()))
            finally:
                secret.wipe()
        finally:
            kek.wipe()
        return record, wrapped

    def deliver(self, subject: Subject, booked: Any, performed: Any) -> Any:
        return performed


def register(table: ActionTable, objects: KmipObjects) -> None:
    table.register(KmipGetWrapped(objects))
