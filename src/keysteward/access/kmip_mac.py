"""KMIP MAC and MACVerify with a managed HMAC key, as actions of the access path (``kmip.mac``,
``kmip.mac_verify``; Cedar ``kmip_mac``, ``kmip_mac_verify`` on the ``KmipObject``).

They deliver :attr:`Delivery.OPERATION`: after the policy's permit the key is unwrapped, used and wiped in
``perform``; only the MAC (or whether it verified) leaves, after its audit record is committed. MAC needs an
Active key (KMIP: a Deactivated key no longer protects); MACVerify also takes a Deactivated one (it may still
process what it protected). The key's Cryptographic Usage Mask, when it has one, must allow MAC Generate or
MAC Verify. HMAC with SHA-256, SHA-384 and SHA-512, one part at a time (no streaming).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.hashes import SHA256, SHA384, SHA512
from cryptography.hazmat.primitives.hmac import HMAC

from keysteward.access.actions import ActionTable, Subject
from keysteward.access.kmip_actions import _KmipAction
from keysteward.access.kmip_attributes import parsed
from keysteward.access.request import Delivery
from keysteward.errors import BadRequest, Conflict
from keysteward.formats.kmip_enums import CRYPTOGRAPHIC_ALGORITHM, CRYPTOGRAPHIC_USAGE_MASK
from keysteward.keys.kmip_objects import KmipObjects

HMAC_HASHES: Final[dict[int, str]] = {
    CRYPTOGRAPHIC_ALGORITHM["HmacSha256"]: "sha256",
    CRYPTOGRAPHIC_ALGORITHM["HmacSha384"]: "sha384",
    CRYPTOGRAPHIC_ALGORITHM["HmacSha512"]: "sha512",
}
"""The HMAC algorithms served, by their KMIP Cryptographic Algorithm."""
HMAC_KEY_BITS: Final[dict[int, tuple[int, int]]] = {
    CRYPTOGRAPHIC_ALGORITHM["HmacSha256"]: (256, 512),
    CRYPTOGRAPHIC_ALGORITHM["HmacSha384"]: (384, 1024),
    CRYPTOGRAPHIC_ALGORITHM["HmacSha512"]: (512, 1024),
}
"""Key lengths a Create of an HMAC key takes: at least the hash's output (RFC 2104 discourages less), at most its
block (a longer key is hashed down first, so it adds nothing)."""
_HASHES: Final[dict[str, type[SHA256 | SHA384 | SHA512]]] = {"sha256": SHA256, "sha384": SHA384, "sha512": SHA512}


@dataclass(frozen=True, repr=False)
class MacRequest:
    data: bytes
    algorithm: int | None = None
    """The Cryptographic Parameters' algorithm, when the client named one: it must be the key's."""
    mac: bytes | None = None
    """MACVerify: the MAC to check."""


def _usable(subject: Subject, states: tuple[str, ...], mask_bit: int) -> tuple[Any, str]:
    record = subject.state.record
    if record.state not in states:
        raise Conflict(f"a {record.state} key is not used for this", code="kmip_wrong_state")
    attributes = parsed(record.attributes)  # shared: only read here
    algorithm = attributes.first("Cryptographic Algorithm")
    if record.object_type != "SymmetricKey" or algorithm is None or algorithm.value not in HMAC_HASHES:
        raise BadRequest("MAC and MACVerify use HMAC keys", code="kmip_invalid_field")
    request: MacRequest = subject.state.inputs.crypto
    if request.algorithm is not None and request.algorithm != algorithm.value:
        raise BadRequest(
            "the Cryptographic Parameters name another algorithm than the key's", code="kmip_invalid_field"
        )
    mask = attributes.first("Cryptographic Usage Mask")
    if mask is not None and isinstance(mask.value, int) and not mask.value & mask_bit:
        raise Conflict("the key's Cryptographic Usage Mask does not allow this", code="kmip_usage_mask")
    return record, HMAC_HASHES[int(algorithm.value)]


class _KmipMacAction(_KmipAction):
    delivery = Delivery.OPERATION
    states: tuple[str, ...] = ("Active",)
    mask_bit = 0

    def perform(self, subject: Subject) -> Any:
        record, hash_name = _usable(subject, self.states, self.mask_bit)
        request: MacRequest = subject.state.inputs.crypto
        key = self.objects.material(record)
        try:
            signer = HMAC(key.view(), _HASHES[hash_name]())
            signer.update(request.data)
            mac = signer.finalize()
        finally:
            key.wipe()
        out = self.result(mac, request)
        subject.details.update(algorithm=hash_name, bytes=len(request.data))
        if isinstance(out, bool):
            subject.details["valid"] = out
        return out

    def result(self, mac: bytes, request: MacRequest) -> Any:
        raise NotImplementedError

    def deliver(self, subject: Subject, booked: Any, performed: Any) -> Any:
        return performed


class KmipMac(_KmipMacAction):
    action, cedar_action = "kmip.mac", "kmip_mac"
    mask_bit = CRYPTOGRAPHIC_USAGE_MASK["MacGenerate"]

    def result(self, mac: bytes, request: MacRequest) -> bytes:
        return mac


class KmipMacVerify(_KmipMacAction):
    action, cedar_action = "kmip.mac_verify", "kmip_mac_verify"
    states = ("Active", "Deactivated")
    mask_bit = CRYPTOGRAPHIC_USAGE_MASK["MacVerify"]

    def result(self, mac: bytes, request: MacRequest) -> bool:
        assert request.mac is not None
        return hmac.compare_digest(mac, request.mac)


def register(table: ActionTable, objects: KmipObjects) -> None:
    for handler in (KmipMac, KmipMacVerify):
        table.register(handler(objects))
