"""The envelope operations applications know from cloud KMSs.

generate-data-key returns a fresh data key in plaintext and sealed under the key's primary
version; encrypt and decrypt handle small payloads (at most 4 KiB) with an optional encryption
context bound as AAD; re-encrypt moves a ciphertext to the newest version (or another key)
inside the server, so the plaintext never leaves it. Every call is audited before it answers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from keysteward.audit.log import AuditLog
from keysteward.crypto.aead import AuthenticationFailed
from keysteward.errors import BadRequest, InvalidCiphertext, KeystewardError, NotFound
from keysteward.formats import ciphertext as blob_codec
from keysteward.identity.principal import Principal
from keysteward.keys.keystore import KeyStore
from keysteward.keys.wrapping import envelope_aad

MAX_PLAINTEXT = 4096
DATA_KEY_SIZES = {"AES_256": 32, "AES_128": 16}


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


class Envelope:
    def __init__(self, keys: KeyStore, audit: AuditLog) -> None:
        self.keys = keys
        self.audit = audit

    def _audit(self, actor: Principal, action: str, target: str, **details: object) -> None:
        self.audit.record(actor.tenant_id, actor=actor.describe(), action=action, target=target, details=details)

    def _audit_failure(self, actor: Principal, action: str, target: str, exc: KeystewardError) -> None:
        self.audit.record(
            actor.tenant_id,
            actor=actor.describe(),
            action=action,
            target=target,
            outcome="error",
            reason=exc.code,
        )

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

    def generate_data_key(
        self,
        actor: Principal,
        key_name: str,
        *,
        key_spec: str = "AES_256",
        context: Mapping[str, str] | None = None,
    ) -> DataKeyPair:
        if key_spec not in DATA_KEY_SIZES:
            raise BadRequest(f"key_spec must be one of {', '.join(DATA_KEY_SIZES)}", code="bad_key_spec")
        target = f"key:{key_name}"
        plaintext = bytearray(os.urandom(DATA_KEY_SIZES[key_spec]))
        try:
            ciphertext, version = self._seal(actor, key_name, plaintext, context)
        except KeystewardError as exc:
            self._audit_failure(actor, "key.generate_data_key", target, exc)
            raise
        self._audit(actor, "key.generate_data_key", target, version=version, key_spec=key_spec)
        return DataKeyPair(plaintext, ciphertext, key_name, version)

    def encrypt(
        self, actor: Principal, key_name: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> tuple[bytes, int]:
        if len(plaintext) > MAX_PLAINTEXT:
            raise BadRequest(
                "encrypt takes at most 4096 bytes; use generate-data-key for more", code="plaintext_too_large"
            )
        target = f"key:{key_name}"
        try:
            ciphertext, version = self._seal(actor, key_name, plaintext, context)
        except KeystewardError as exc:
            self._audit_failure(actor, "key.encrypt", target, exc)
            raise
        self._audit(actor, "key.encrypt", target, version=version, bytes=len(plaintext))
        return ciphertext, version

    def decrypt(self, actor: Principal, data: bytes, context: Mapping[str, str] | None = None) -> Decrypted:
        try:
            result = self._open(actor, data, context)
        except KeystewardError as exc:
            self._audit_failure(actor, "key.decrypt", "ciphertext", exc)
            raise
        try:
            self._audit(actor, "key.decrypt", f"key:{result.key}", version=result.version)
        except KeystewardError:
            result.plaintext[:] = bytes(len(result.plaintext))
            raise
        return result

    def re_encrypt(
        self,
        actor: Principal,
        data: bytes,
        *,
        context: Mapping[str, str] | None = None,
        destination_key: str | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> tuple[bytes, str, int]:
        try:
            source = self._open(actor, data, context)
            try:
                dest = destination_key or source.key
                ciphertext, version = self._seal(
                    actor,
                    dest,
                    source.plaintext,
                    context if destination_context is None else destination_context,
                )
            finally:
                source.plaintext[:] = bytes(len(source.plaintext))
        except KeystewardError as exc:
            self._audit_failure(actor, "key.re_encrypt", "ciphertext", exc)
            raise
        self._audit(
            actor,
            "key.re_encrypt",
            f"key:{dest}",
            source_key=source.key,
            source_version=source.version,
            version=version,
        )
        return ciphertext, dest, version
