"""The AWS KMS external key store (XKS) calls as actions of the access path.

``xks.metadata``, ``xks.encrypt`` and ``xks.decrypt`` are decided by the tenant's Cedar policy as the
actions ``describe_key``, ``encrypt`` and ``decrypt`` of a ``CloudService`` principal (the store's SigV4
credential, id ``tenant/access key id``, with the store's prefix) on the external key's ``Key``, with the
call's ``requestMetadata`` as ``context.kms`` (``operation``, ``request_id``, ``principal_arn``,
``key_arn``, ``via_service``, ``source_vpc``, ``source_vpce``). No built-in policy grants a
CloudService anything: the tenant permits what its KMS may do.

They deliver :attr:`~keysteward.access.request.Delivery.OPERATION`: the AES-GCM runs after the permit
(:mod:`keysteward.keys.xks_crypto`), its result held until the audit record (with the kmsRequestId, the
principal, the outcome and the latency) is committed. An unknown external key id is not asked of the
policy: it is recorded as an error ``key_not_found``. The key's usage (encrypt, decrypt, both, none) is
checked after the permit, so a refusal for usage is recorded with the policy that allowed the call.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Subject
from keysteward.access.request import AccessRequest, Delivery, RequestContext, Resource
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import Conflict, Denied, KeystewardError, NotFound
from keysteward.formats.xks_wire import (
    DecryptRequest,
    EncryptRequest,
    EncryptResult,
    RequestMetadata,
    integrity_value,
)
from keysteward.identity.principal import Principal
from keysteward.keys.keystore import ENABLED, KeyStore
from keysteward.keys.xks_crypto import XksCrypto, metadata_version
from keysteward.keys.xks_registry import KeyLink, StoreRef, XksRegistry
from keysteward.lru import Lru
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.store import PolicyVersion

RECENT_FACTS = 1024
"""Call facts remembered for reuse within their second (see ``_XksCall._facts``)."""
PRINCIPAL_KIND = "xks"
"""``Principal.kind`` of a caller authenticated by an XKS store's SigV4 credential."""


@dataclass(frozen=True, repr=False)
class XksInputs:
    store: StoreRef
    external_id: str
    metadata: RequestMetadata
    started: float
    """``time.perf_counter()`` when the call arrived: the audit record carries the latency from there."""
    encrypt: EncryptRequest | None = None
    decrypt: DecryptRequest | None = None


@dataclass(frozen=True)
class KeyMetadata:
    enabled: bool
    usage: tuple[str, ...]


@dataclass(frozen=True, repr=False)
class Encrypted:
    result: EncryptResult
    integrity: bytes | None


def credential_principal(store: StoreRef, access_key_id: str) -> Principal:
    return Principal(store.tenant_id, store.tenant, "kms", access_key_id, PRINCIPAL_KIND)


class _XksCall(ActionHandler):
    delivery = Delivery.OPERATION
    writes = False  # check and book only decide: the record is the only row written
    needs: str | None = None
    """The keyUsage value the key must carry (ENCRYPT, DECRYPT), None for metadata."""

    def __init__(self, registry: XksRegistry, crypto: XksCrypto, keys: KeyStore) -> None:
        self.registry = registry
        self.crypto = crypto
        self.keys = keys
        self._recent: Lru[tuple[Any, ...], PolicyRequest] = Lru(RECENT_FACTS)

    def warm(self, request: AccessRequest, tenant_id: str) -> bool:
        inputs: XksInputs = request.inputs
        link = self.registry.cached_key(inputs.store, inputs.external_id)
        if link is None:
            return False
        version = None
        if inputs.decrypt is not None:
            try:
                version = metadata_version(inputs.decrypt.ciphertext_metadata)
            except KeystewardError:
                return True  # refused without a database read
        return self.keys.is_warm(tenant_id, key_id=link.key_id, version=version)

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        who = request.principal
        if who is None or who.kind != PRINCIPAL_KIND:
            raise Denied("an XKS call needs a store's SigV4 credential", code="no_credentials")
        inputs: XksInputs = request.inputs
        if inputs.store.tenant_id != tenant_id:
            raise NotFound("no such external key store", code="xks_store_not_found")
        link = self.registry.key(inputs.store, inputs.external_id)
        meta = inputs.metadata
        details: dict[str, Any] = {
            "store": inputs.store.prefix,
            "external_key_id": inputs.external_id,
            "kms_request_id": meta.request_id,
            "kms_operation": meta.operation,
        }
        for name in ("principal_arn", "key_arn", "via_service", "source_vpc", "source_vpce"):
            value = getattr(meta, name)
            if value is not None:
                details[f"kms_{name}" if not name.startswith("source") else f"aws_{name}"] = value
        target = f"key:{link.key_name}" if link is not None else f"xks_key:{inputs.external_id}"
        subject = Subject(tenant_id, who.describe(), target, None, details=details, state=(inputs, link))
        if link is not None:
            subject.facts = self._facts(request, link, now)
        return subject

    def _facts(self, request: AccessRequest, link: KeyLink, now: datetime) -> PolicyRequest:
        """The facts of one call. They hold the time to the second, so the same credential using the same key
        from the same address with the same requestMetadata within a second gets the same (immutable)
        request, as a key use of the REST API does (:mod:`keysteward.access.key_actions`). KMS gives each
        call a new kmsRequestId: a call like a recent one but for it gets the recent one's facts with its
        own ``context.kms`` (:meth:`PolicyRequest.with_kms`, a third of the cost of new facts)."""
        assert request.principal is not None and self.cedar_action is not None
        inputs: XksInputs = request.inputs
        kms = inputs.metadata.facts()
        alike = tuple(sorted(item for item in kms.items() if item[0] != "request_id"))
        recent = (request.tenant, request.principal.describe(), inputs.store.prefix, link.key_name,
                  request.context.source, alike, int(now.timestamp()))  # fmt: skip
        facts = self._recent.get_or_make(recent, lambda: self._make_facts(request, link, now, kms))
        return facts if facts.kms == kms else facts.with_kms(kms)

    def _make_facts(self, request: AccessRequest, link: KeyLink, now: datetime, kms: dict[str, str]) -> PolicyRequest:
        assert request.principal is not None and self.cedar_action is not None
        inputs: XksInputs = request.inputs
        return PolicyRequest(
            tenant=request.tenant,
            action=self.cedar_action,
            principal={"type": "CloudService", "name": request.principal.name, "store": inputs.store.prefix},
            resource={"type": "Key", "name": link.key_name},
            identity={},
            platform={},
            time=now,
            source_ip=request.context.address(),
            kms=kms,
        )

    @staticmethod
    def _latency(subject: Subject) -> None:
        inputs: XksInputs = subject.state[0]
        subject.details["latency_ms"] = round((time.perf_counter() - inputs.started) * 1000, 3)

    def denial(self, policy: PolicyVersion, decision: PolicyDecision, subject: Subject) -> Denied:
        self._latency(subject)
        denied = super().denial(policy, decision, subject)
        request_id = subject.state[0].metadata.request_id
        return Denied(f"kmsRequestId {request_id[:128]}: {denied.message}", code=denied.code)

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        if decision.effect == "approval":
            raise Denied(
                "XKS calls are not held for approval: the policy must permit or deny them", code="approval_unsupported"
            )
        self._latency(subject)
        return Booked()

    def perform(self, subject: Subject) -> Any:
        inputs, link = subject.state
        try:
            if link is None:
                raise NotFound(f"no external key '{inputs.external_id[:128]}' in this store", code="key_not_found")
            if self.needs is not None and self.needs not in link.key_usage:
                raise Conflict(f"the external key's usage is '{link.usage}'", code="invalid_key_usage")
            return self.run(inputs, link)
        finally:
            self._latency(subject)

    def run(self, inputs: XksInputs, link: KeyLink) -> Any:
        raise NotImplementedError

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> Any:
        return performed


class XksMetadata(_XksCall):
    action, cedar_action = "xks.metadata", "describe_key"

    def run(self, inputs: XksInputs, link: KeyLink) -> KeyMetadata:
        ref = self.keys.key_ref(inputs.store.tenant_id, key_id=link.key_id)
        return KeyMetadata(ref is not None and ref.state == ENABLED, link.key_usage)


class XksEncrypt(_XksCall):
    action, cedar_action, needs = "xks.encrypt", "encrypt", "ENCRYPT"

    def run(self, inputs: XksInputs, link: KeyLink) -> Encrypted:
        call = inputs.encrypt
        assert call is not None
        tenant_id = inputs.store.tenant_id
        result = self.crypto.encrypt(tenant_id, link.key_id, call.plaintext, call.aad)
        if not call.want_integrity_value:
            return Encrypted(result, None)
        # Appendix C: the integrity value first, then the decrypt that proves it, so a corruption between
        # the two cannot be vouched for
        integrity = integrity_value(call.aad, result)
        check = self.crypto.decrypt(tenant_id, link.key_id, result, call.aad)
        try:
            if not hmac.compare_digest(bytes(check), call.plaintext):
                raise KeystewardError("the verifying decrypt disagrees with the encrypt", code="internal")
        finally:
            wipe_bytearray(check)
        return Encrypted(result, integrity)


class XksDecrypt(_XksCall):
    action, cedar_action, needs = "xks.decrypt", "decrypt", "DECRYPT"

    def run(self, inputs: XksInputs, link: KeyLink) -> bytearray:
        call = inputs.decrypt
        assert call is not None
        sealed = EncryptResult(call.ciphertext, call.iv, call.tag, call.ciphertext_metadata)
        return self.crypto.decrypt(inputs.store.tenant_id, link.key_id, sealed, call.aad)

    def discard(self, subject: Subject, performed: Any) -> None:
        wipe_bytearray(performed)


def register(table: ActionTable, registry: XksRegistry, crypto: XksCrypto, keys: KeyStore) -> None:
    for handler in (XksMetadata, XksEncrypt, XksDecrypt):
        table.register(handler(registry, crypto, keys))


def xks_request(who: Principal, action: str, inputs: XksInputs, source: str) -> AccessRequest:
    """The access request of one XKS call (the front-end's only way to the external keys)."""
    return AccessRequest(
        tenant=inputs.store.tenant,
        action=action,
        resource=Resource("Key", inputs.external_id),
        delivery=Delivery.OPERATION,
        principal=who,
        context=RequestContext(source=source, front_end="xks", request_id=inputs.metadata.request_id),
        inputs=inputs,
    )
