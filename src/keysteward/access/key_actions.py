"""Envelope operations on ``Key`` resources as actions of the access path, and the facade that asks for them.

``key.generate_data_key``, ``key.encrypt``, ``key.decrypt`` and ``key.re_encrypt`` are decided by the
tenant's policy (Cedar actions ``generate_data_key``, ``encrypt``, ``decrypt``, ``re_encrypt`` on
``Key::"tenant/name"``; re-encrypt is asked for the source key and, when it differs, the destination).
They deliver :attr:`~keysteward.access.request.Delivery.OPERATION`: the operation runs after the permit,
its result is held until its audit record (with the outcome) is committed, then handed out. A denial runs
nothing. A request whose key does not exist is still asked of the policy by name first, so a principal
the policy does not know learns nothing about which keys exist.

:class:`KeyUse` is what front-ends call (REST today, KMIP and XKS next): it builds the request, so
they never reach :class:`~keysteward.keys.envelope.Envelope` themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.actions import ActionHandler, ActionTable, Booked, Subject
from keysteward.access.principals import policy_principal
from keysteward.access.request import AccessRequest, Delivery, RequestContext, Resource
from keysteward.access.service import AccessService
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import BadRequest, Denied, KeystewardError
from keysteward.identity.principal import Principal
from keysteward.keys.envelope import MAX_PLAINTEXT, DataKeyPair, Decrypted, Envelope
from keysteward.lru import Lru
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.facts import PolicyRequest

RECENT_FACTS = 1024
"""Key-use facts remembered for reuse within their second (see ``_KeyUse._facts``)."""

Context = Mapping[str, str] | None
__all__ = ["DataKeyPair", "Decrypted", "KeyUse", "KeyUseInputs", "register"]


@dataclass(frozen=True, repr=False)
class KeyUseInputs:
    key_name: str | None = None
    plaintext: bytes | None = None
    ciphertext: bytes | None = None
    context: Context = None
    key_spec: str = "AES_256"
    destination_key: str | None = None
    destination_context: Context = None


@dataclass
class _State:
    inputs: KeyUseInputs
    key: str | None
    """The key named (by the caller or in the ciphertext), None when the ciphertext names none."""
    failure: KeystewardError | None = None


class _KeyUse(ActionHandler):
    delivery = Delivery.OPERATION
    writes = False  # check and book only decide: the record is the only row written

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self._recent: Lru[tuple[Any, ...], PolicyRequest] = Lru(RECENT_FACTS)

    def warm(self, request: AccessRequest, tenant_id: str) -> bool:
        inputs: KeyUseInputs = request.inputs
        if inputs.ciphertext is not None:
            return self.envelope.warm(tenant_id, ciphertext=inputs.ciphertext)
        return self.envelope.warm(tenant_id, name=inputs.key_name)

    def _facts(self, request: AccessRequest, key: str, now: datetime, context: Context) -> PolicyRequest:
        """The facts of one key use. They hold the time to the second, so the same caller using the same key
        from the same address with the same context within a second gets the same (immutable) request."""
        assert request.principal is not None and self.cedar_action is not None
        ctx = tuple(sorted((context or {}).items()))
        recent = (request.tenant, request.principal.describe(), key, request.context.source, ctx, int(now.timestamp()))
        return self._recent.get_or_make(recent, lambda: self._make_facts(request, key, now, context))

    def _make_facts(self, request: AccessRequest, key: str, now: datetime, context: Context) -> PolicyRequest:
        assert request.principal is not None and self.cedar_action is not None
        return PolicyRequest(
            tenant=request.tenant,
            action=self.cedar_action,
            principal=policy_principal(request.principal),
            resource={"type": "Key", "name": key},
            identity={},
            platform={},
            time=now,
            source_ip=request.context.address(),
            encryption_context=dict(context or {}),
        )

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        if request.principal is None:
            raise Denied("a key use needs an authenticated principal", code="no_credentials")
        policy_principal(request.principal)  # the system tenant's principals are refused before anything else
        inputs: KeyUseInputs = request.inputs
        state = _State(inputs, inputs.key_name)
        if inputs.ciphertext is not None:
            try:
                state.key = self.envelope.key_of(tenant_id, inputs.ciphertext).name
            except KeystewardError as exc:  # names no key of this tenant: nothing to ask, recorded as an error
                state.failure = exc
        target = f"key:{state.key}" if state.key else "ciphertext"
        subject = Subject(tenant_id, request.principal.describe(), target, None, state=state)
        if state.key is not None:
            subject.facts = self._facts(request, state.key, now, inputs.context)
            if inputs.destination_key not in (None, state.key):
                assert inputs.destination_key is not None
                context = inputs.context if inputs.destination_context is None else inputs.destination_context
                subject.more_facts = (self._facts(request, inputs.destination_key, now, context),)
        return subject

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        if decision.effect == "approval":
            raise Denied("key uses are not held for approval: the policy must permit or deny them",
                         code="approval_unsupported")  # fmt: skip
        return Booked()

    def perform(self, subject: Subject) -> Any:
        state: _State = subject.state
        if state.failure is not None:
            raise state.failure
        return self.run(subject, state)

    def run(self, subject: Subject, state: _State) -> Any:
        raise NotImplementedError

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> Any:
        return performed


class GenerateDataKey(_KeyUse):
    action, cedar_action = "key.generate_data_key", "generate_data_key"

    def run(self, subject: Subject, state: _State) -> DataKeyPair:
        assert state.key is not None
        plaintext = self.envelope.new_data_key(state.inputs.key_spec)
        try:
            ciphertext, version = self.envelope.seal(subject.tenant_id, state.key, plaintext, state.inputs.context)
        except BaseException:
            wipe_bytearray(plaintext)
            raise
        subject.details.update(version=version, key_spec=state.inputs.key_spec)
        return DataKeyPair(plaintext, ciphertext, state.key, version)

    def discard(self, subject: Subject, performed: Any) -> None:
        wipe_bytearray(performed.plaintext)


class Encrypt(_KeyUse):
    action, cedar_action = "key.encrypt", "encrypt"

    def run(self, subject: Subject, state: _State) -> tuple[bytes, int]:
        assert state.key is not None and state.inputs.plaintext is not None
        ciphertext, version = self.envelope.seal(
            subject.tenant_id, state.key, state.inputs.plaintext, state.inputs.context
        )
        subject.details.update(version=version, bytes=len(state.inputs.plaintext))
        return ciphertext, version


class Decrypt(_KeyUse):
    action, cedar_action = "key.decrypt", "decrypt"

    def run(self, subject: Subject, state: _State) -> Decrypted:
        assert state.inputs.ciphertext is not None
        result = self.envelope.open(subject.tenant_id, state.inputs.ciphertext, state.inputs.context)
        subject.details.update(version=result.version)
        return result

    def discard(self, subject: Subject, performed: Any) -> None:
        wipe_bytearray(performed.plaintext)


class ReEncrypt(_KeyUse):
    action, cedar_action = "key.re_encrypt", "re_encrypt"

    def run(self, subject: Subject, state: _State) -> tuple[bytes, str, int]:
        inputs = state.inputs
        assert inputs.ciphertext is not None
        source = self.envelope.open(subject.tenant_id, inputs.ciphertext, inputs.context)
        try:
            dest = inputs.destination_key or source.key
            dest_context = inputs.context if inputs.destination_context is None else inputs.destination_context
            ciphertext, version = self.envelope.seal(subject.tenant_id, dest, source.plaintext, dest_context)
        finally:
            wipe_bytearray(source.plaintext)
        subject.target = f"key:{dest}"
        subject.details.update(source_key=source.key, source_version=source.version, version=version)
        return ciphertext, dest, version


def register(table: ActionTable, envelope: Envelope) -> None:
    for handler in (GenerateDataKey, Encrypt, Decrypt, ReEncrypt):
        table.register(handler(envelope))


class KeyUse:
    """The envelope operations as front-ends ask for them: each one an access request, decided by the one path."""

    def __init__(self, access: AccessService, envelope: Envelope) -> None:
        self.access = access
        self.envelope = envelope

    @staticmethod
    def _request(who: Principal, action: str, key: str, inputs: KeyUseInputs, source: str) -> AccessRequest:
        return AccessRequest(
            tenant=who.tenant,
            action=action,
            resource=Resource("Key", key),
            delivery=Delivery.OPERATION,
            principal=who,
            context=RequestContext(source=source),
            inputs=inputs,
        )

    def generate_data_key_request(
        self, who: Principal, key_name: str, key_spec: str = "AES_256", context: Context = None, source: str = ""
    ) -> AccessRequest:
        self.envelope.new_data_key(key_spec)  # refuses a bad spec before anything is asked or recorded
        inputs = KeyUseInputs(key_name=key_name, context=context, key_spec=key_spec)
        return self._request(who, "key.generate_data_key", key_name, inputs, source)

    def encrypt_request(
        self, who: Principal, key_name: str, plaintext: bytes, context: Context = None, source: str = ""
    ) -> AccessRequest:
        if len(plaintext) > MAX_PLAINTEXT:
            raise BadRequest(
                "encrypt takes at most 4096 bytes; use generate-data-key for more", code="plaintext_too_large"
            )
        inputs = KeyUseInputs(key_name=key_name, plaintext=plaintext, context=context)
        return self._request(who, "key.encrypt", key_name, inputs, source)

    def decrypt_request(self, who: Principal, data: bytes, context: Context = None, source: str = "") -> AccessRequest:
        return self._request(who, "key.decrypt", "", KeyUseInputs(ciphertext=data, context=context), source)

    def re_encrypt_request(
        self,
        who: Principal,
        data: bytes,
        context: Context = None,
        destination_key: str | None = None,
        destination_context: Context = None,
        source: str = "",
    ) -> AccessRequest:
        inputs = KeyUseInputs(
            ciphertext=data, context=context, destination_key=destination_key, destination_context=destination_context
        )
        return self._request(who, "key.re_encrypt", "", inputs, source)

    # -- from a thread ------------------------------------------------------------------------------
    def generate_data_key(
        self, who: Principal, key_name: str, *, key_spec: str = "AES_256", context: Context = None
    ) -> DataKeyPair:
        result: DataKeyPair = self.access.decide(self.generate_data_key_request(who, key_name, key_spec, context))
        return result

    def encrypt(self, who: Principal, key_name: str, plaintext: bytes, context: Context = None) -> tuple[bytes, int]:
        result: tuple[bytes, int] = self.access.decide(self.encrypt_request(who, key_name, plaintext, context))
        return result

    def decrypt(self, who: Principal, data: bytes, context: Context = None) -> Decrypted:
        result: Decrypted = self.access.decide(self.decrypt_request(who, data, context))
        return result

    def re_encrypt(
        self,
        who: Principal,
        data: bytes,
        *,
        context: Context = None,
        destination_key: str | None = None,
        destination_context: Context = None,
    ) -> tuple[bytes, str, int]:
        request = self.re_encrypt_request(who, data, context, destination_key, destination_context)
        result: tuple[bytes, str, int] = self.access.decide(request)
        return result
