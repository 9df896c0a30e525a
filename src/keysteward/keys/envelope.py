"""The envelope operations applications know from cloud KMSs.

generate-data-key returns a fresh data key in plaintext and sealed under the key's primary
version; encrypt and decrypt handle small payloads (at most 4 KiB) with an optional encryption
context bound as AAD; re-encrypt moves a ciphertext to the newest version (or another key)
inside the server, so the plaintext never leaves it. Every call is audited before it answers.

Each operation is one function that does the work and says what to audit (an :class:`Outcome`);
:meth:`Envelope.run` (threads) and :meth:`Envelope.run_async` (the event loop) then write the audit
record, wait for it to be committed, and only then hand out the result.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio.to_thread

from keysteward.audit.log import AuditLog
from keysteward.crypto.aead import AuthenticationFailed
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import BadRequest, InvalidCiphertext, KeystewardError, NotFound
from keysteward.formats import ciphertext as blob_codec
from keysteward.identity.principal import Principal
from keysteward.keys.keystore import KeyStore
from keysteward.keys.wrapping import envelope_aad

MAX_PLAINTEXT = 4096
DATA_KEY_SIZES = {"AES_256": 32, "AES_128": 16}
T = TypeVar("T")


@dataclass(frozen=True, repr=False)
class DataKeyPair:
    plaintext: bytearray
    ciphertext: bytes
    key: str
    version: int

    def __repr__(self) -> str:
        return f"DataKeyPair(key={self.key}, version={self.version})"


@dataclass(frozen=True, repr=False)
class Decrypted:
    plaintext: bytearray
    key: str
    version: int

    def __repr__(self) -> str:
        return f"Decrypted(key={self.key}, version={self.version})"


@dataclass
class Outcome(Generic[T]):
    """What an operation produced (or the error it hit) and the audit record that must come first."""

    action: str
    target: str
    result: T | None = None
    error: KeystewardError | None = None
    details: dict[str, Any] = field(default_factory=dict)
    secret: bytearray | None = None  # wiped if the audit record cannot be written

    def audit_fields(self, actor: Principal) -> dict[str, Any]:
        if self.error is not None:
            return {
                "actor": actor.describe(),
                "action": self.action,
                "target": self.target,
                "outcome": "error",
                "reason": self.error.code,
            }
        return {"actor": actor.describe(), "action": self.action, "target": self.target, "details": self.details}

    def unwrap(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


Op = Callable[[], Outcome[T]]


class Envelope:
    def __init__(self, keys: KeyStore, audit: AuditLog) -> None:
        self.keys = keys
        self.audit = audit

    # -- running an operation: audit first, then the answer -----------------------------------------
    def run(self, actor: Principal, op: Op[T]) -> T:
        outcome = op()
        try:
            self.audit.record(actor.tenant_id, **outcome.audit_fields(actor))
        except KeystewardError:
            if outcome.secret is not None:
                wipe_bytearray(outcome.secret)
            raise
        return outcome.unwrap()

    async def run_async(self, actor: Principal, op: Op[T], *, warm: bool) -> T:
        """As :meth:`run`; ``warm`` says the caches hold all it needs, so it may run on the event loop."""
        outcome = op() if warm else await anyio.to_thread.run_sync(op)
        try:
            await self.audit.record_async(actor.tenant_id, **outcome.audit_fields(actor))
        except KeystewardError:
            if outcome.secret is not None:
                wipe_bytearray(outcome.secret)
            raise
        return outcome.unwrap()

    def warm(self, actor: Principal, *, name: str | None = None, ciphertext: bytes | None = None) -> bool:
        """Whether an operation on this key (by name, or named in the ciphertext) needs no database read."""
        if ciphertext is not None:
            try:
                blob = blob_codec.decode(ciphertext)
            except KeystewardError:
                return True  # fails without touching the database
            return self.keys.is_warm(actor.tenant_id, key_id=str(blob.key_id), version=blob.version)
        return self.keys.is_warm(actor.tenant_id, name=name)

    # -- the operations ------------------------------------------------------------------------------
    def _seal(
        self, actor: Principal, key_name: str, plaintext: bytes | bytearray, context: Mapping[str, str] | None
    ) -> tuple[bytes, int]:
        ref = self.keys.key_ref(actor.tenant_id, name=key_name)
        if ref is None:
            raise NotFound(f"no key '{key_name}'", code="key_not_found")
        self.keys.require_enabled(ref)
        version = ref.primary_version
        kek = self.keys.usable_kek(actor.tenant_id, ref.id, version)
        sealed = kek.seal(plaintext, envelope_aad(actor.tenant_id, ref.id, version, context))
        return blob_codec.encode(blob_codec.CiphertextBlob(uuid.UUID(ref.id), version, sealed)), version

    def _open(self, actor: Principal, data: bytes, context: Mapping[str, str] | None) -> Decrypted:
        blob = blob_codec.decode(data)
        key_id = str(blob.key_id)
        ref = self.keys.key_ref(actor.tenant_id, key_id=key_id)
        if ref is None:  # another tenant's ciphertext reads as no ciphertext at all
            raise InvalidCiphertext("the ciphertext does not name a key of this tenant")
        self.keys.require_enabled(ref)
        kek = self.keys.usable_kek(actor.tenant_id, key_id, blob.version)
        try:
            plaintext = kek.open(blob.sealed, envelope_aad(actor.tenant_id, key_id, blob.version, context))
        except AuthenticationFailed as exc:
            raise InvalidCiphertext(
                "the ciphertext does not open: it was altered, or the encryption context differs",
            ) from exc
        return Decrypted(plaintext, ref.name, blob.version)

    def generate_data_key_op(
        self, actor: Principal, key_name: str, key_spec: str, context: Mapping[str, str] | None
    ) -> Op[DataKeyPair]:
        if key_spec not in DATA_KEY_SIZES:
            raise BadRequest(f"key_spec must be one of {', '.join(DATA_KEY_SIZES)}", code="bad_key_spec")

        def op() -> Outcome[DataKeyPair]:
            outcome: Outcome[DataKeyPair] = Outcome("key.generate_data_key", f"key:{key_name}")
            plaintext = bytearray(os.urandom(DATA_KEY_SIZES[key_spec]))
            try:
                ciphertext, version = self._seal(actor, key_name, plaintext, context)
            except KeystewardError as exc:
                outcome.error = exc
                return outcome
            outcome.result = DataKeyPair(plaintext, ciphertext, key_name, version)
            outcome.details, outcome.secret = {"version": version, "key_spec": key_spec}, plaintext
            return outcome

        return op

    def encrypt_op(
        self, actor: Principal, key_name: str, plaintext: bytes, context: Mapping[str, str] | None
    ) -> Op[tuple[bytes, int]]:
        if len(plaintext) > MAX_PLAINTEXT:
            raise BadRequest(
                "encrypt takes at most 4096 bytes; use generate-data-key for more", code="plaintext_too_large"
            )

        def op() -> Outcome[tuple[bytes, int]]:
            outcome: Outcome[tuple[bytes, int]] = Outcome("key.encrypt", f"key:{key_name}")
            try:
                outcome.result = self._seal(actor, key_name, plaintext, context)
            except KeystewardError as exc:
                outcome.error = exc
                return outcome
            outcome.details = {"version": outcome.result[1], "bytes": len(plaintext)}
            return outcome

        return op

    def decrypt_op(self, actor: Principal, data: bytes, context: Mapping[str, str] | None) -> Op[Decrypted]:
        def op() -> Outcome[Decrypted]:
            outcome: Outcome[Decrypted] = Outcome("key.decrypt", "ciphertext")
            try:
                result = self._open(actor, data, context)
            except KeystewardError as exc:
                outcome.error = exc
                return outcome
            outcome.result, outcome.target, outcome.secret = result, f"key:{result.key}", result.plaintext
            outcome.details = {"version": result.version}
            return outcome

        return op

    def re_encrypt_op(
        self,
        actor: Principal,
        data: bytes,
        context: Mapping[str, str] | None,
        destination_key: str | None,
        destination_context: Mapping[str, str] | None,
    ) -> Op[tuple[bytes, str, int]]:
        def op() -> Outcome[tuple[bytes, str, int]]:
            outcome: Outcome[tuple[bytes, str, int]] = Outcome("key.re_encrypt", "ciphertext")
            try:
                source = self._open(actor, data, context)
                try:
                    dest = destination_key or source.key
                    dest_context = context if destination_context is None else destination_context
                    ciphertext, version = self._seal(actor, dest, source.plaintext, dest_context)
                finally:
                    wipe_bytearray(source.plaintext)
            except KeystewardError as exc:
                outcome.error = exc
                return outcome
            outcome.result, outcome.target = (ciphertext, dest, version), f"key:{dest}"
            outcome.details = {"source_key": source.key, "source_version": source.version, "version": version}
            return outcome

        return op

    # -- the same, called from a thread --------------------------------------------------------------
    def generate_data_key(
        self, actor: Principal, key_name: str, *, key_spec: str = "AES_256", context: Mapping[str, str] | None = None
    ) -> DataKeyPair:
        return self.run(actor, self.generate_data_key_op(actor, key_name, key_spec, context))

    def encrypt(
        self, actor: Principal, key_name: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> tuple[bytes, int]:
        return self.run(actor, self.encrypt_op(actor, key_name, plaintext, context))

    def decrypt(self, actor: Principal, data: bytes, context: Mapping[str, str] | None = None) -> Decrypted:
        return self.run(actor, self.decrypt_op(actor, data, context))

    def re_encrypt(
        self,
        actor: Principal,
        data: bytes,
        *,
        context: Mapping[str, str] | None = None,
        destination_key: str | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> tuple[bytes, str, int]:
        return self.run(actor, self.re_encrypt_op(actor, data, context, destination_key, destination_context))
