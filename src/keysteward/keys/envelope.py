"""The envelope cryptography applications know from cloud KMSs, under a tenant's keys.

generate-data-key makes a fresh data key and seals it under the key's primary version; encrypt and
decrypt handle small payloads (at most 4 KiB) with an optional encryption context bound as AAD;
re-encrypt opens and seals again inside the server, so the plaintext never leaves it. Who may do which is
not decided here: :mod:`keysteward.access.key_actions` runs these only on a permit of the access path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from keysteward.crypto.aead import AuthenticationFailed
from keysteward.errors import BadRequest, InvalidCiphertext, KeystewardError, NotFound
from keysteward.formats import ciphertext as blob_codec
from keysteward.keys.keystore import KeyStore
from keysteward.keys.model import KeyRef
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
    """The envelope cryptography under a tenant's keys. It decides nothing and audits nothing: the access
    service (:mod:`keysteward.access.key_actions`) asks the policy, records, and only then hands out results."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    def warm(self, tenant_id: str, *, name: str | None = None, ciphertext: bytes | None = None) -> bool:
        """Whether an operation on this key (by name, or named in the ciphertext) needs no database read."""
        if ciphertext is not None:
            try:
                blob = blob_codec.decode(ciphertext)
            except KeystewardError:
                return True  # fails without touching the database
            return self.keys.is_warm(tenant_id, key_id=str(blob.key_id), version=blob.version)
        return self.keys.is_warm(tenant_id, name=name)

    def key_named(self, tenant_id: str, key_name: str) -> KeyRef:
        ref = self.keys.key_ref(tenant_id, name=key_name)
        if ref is None:
            raise NotFound(f"no key '{key_name}'", code="key_not_found")
        return ref

    def key_of(self, tenant_id: str, data: bytes) -> KeyRef:
        """The key a ciphertext names (read from its header, nothing opened)."""
        blob = blob_codec.decode(data)
        ref = self.keys.key_ref(tenant_id, key_id=str(blob.key_id))
        if ref is None:  # another tenant's ciphertext reads as no ciphertext at all
            raise InvalidCiphertext("the ciphertext does not name a key of this tenant")
        return ref

    # -- the operations ------------------------------------------------------------------------------
    def seal(
        self, tenant_id: str, key_name: str, plaintext: bytes | bytearray, context: Mapping[str, str] | None
    ) -> tuple[bytes, int]:
        """``plaintext`` sealed under the key's primary version: (ciphertext blob, version)."""
        ref = self.key_named(tenant_id, key_name)
        self.keys.require_enabled(ref)
        version = ref.primary_version
        kek = self.keys.usable_kek(tenant_id, ref.id, version)
        sealed = kek.seal(plaintext, envelope_aad(tenant_id, ref.id, version, context))
        return blob_codec.encode(blob_codec.CiphertextBlob(uuid.UUID(ref.id), version, sealed)), version

    def open(self, tenant_id: str, data: bytes, context: Mapping[str, str] | None) -> Decrypted:
        """A ciphertext blob opened (the plaintext in a bytearray the caller wipes)."""
        blob = blob_codec.decode(data)
        ref = self.key_of(tenant_id, data)
        self.keys.require_enabled(ref)
        kek = self.keys.usable_kek(tenant_id, ref.id, blob.version)
        try:
            plaintext = kek.open(blob.sealed, envelope_aad(tenant_id, ref.id, blob.version, context))
        except AuthenticationFailed as exc:
            raise InvalidCiphertext(
                "the ciphertext does not open: it was altered, or the encryption context differs",
            ) from exc
        return Decrypted(plaintext, ref.name, blob.version)

    def new_data_key(self, key_spec: str) -> bytearray:
        if key_spec not in DATA_KEY_SIZES:
            raise BadRequest(f"key_spec must be one of {', '.join(DATA_KEY_SIZES)}", code="bad_key_spec")
        return bytearray(os.urandom(DATA_KEY_SIZES[key_spec]))
