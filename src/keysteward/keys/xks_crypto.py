"""AES-256-GCM for AWS KMS external keys (XKS), under the versions of a tenant key.

An external key is a keysteward key: its versions are wrapped under the root key like every KEK, a
rotation adds a version, a destroy crypto-shreds. Encrypt uses the primary version and says which in
``ciphertextMetadata`` (``b"ks1"`` and the version, 4 bytes big-endian: 7 of the 20 bytes the spec
allows), which the spec's AAD framing binds into the tag; decrypt reads the version back from it.

Domain separation: every AAD keysteward itself uses under a KEK begins with ``keysteward/`` (0x6b...),
while the framed XKS AAD begins with its 2-byte length, at most 8192 (0x2000): no XKS call can make or
open a wrapped data key or an envelope blob, whatever AAD the caller chooses.

Who may do which is not decided here: :mod:`keysteward.access.xks_actions` runs these on a permit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from sqlalchemy import select

from keysteward.crypto.aead import NONCE_SIZE, TAG_SIZE, AeadKey, AuthenticationFailed
from keysteward.errors import InvalidCiphertext, KeystewardError
from keysteward.formats.xks_wire import MAX_AAD, EncryptResult, framed_aad
from keysteward.keys.keystore import KeyStore
from keysteward.keys.model import KeyRef
from keysteward.store.db import Database
from keysteward.store.frontend_models import XksStore

METADATA_TAG = b"ks1"
METADATA_SIZE = len(METADATA_TAG) + 4


def version_metadata(version: int) -> bytes:
    return METADATA_TAG + version.to_bytes(4, "big")


def metadata_version(metadata: bytes | None) -> int:
    """The key version a ciphertextMetadata names, or InvalidCiphertext."""
    if metadata is None or len(metadata) != METADATA_SIZE or not metadata.startswith(METADATA_TAG):
        raise InvalidCiphertext("the ciphertext metadata is missing or was not made by keysteward")
    version = int.from_bytes(metadata[len(METADATA_TAG) :], "big")
    if version < 1:
        raise InvalidCiphertext("the ciphertext metadata names no key version")
    return version


@dataclass(frozen=True)
class Probe:
    """What a health probe saw: whether a test encrypt and decrypt worked, and how long a read took."""

    working: bool
    sealed: bool
    database_ms: float
    problem: str = ""


class XksCrypto:
    def __init__(self, keys: KeyStore, db: Database) -> None:
        self.keys = keys
        self.db = db

    def _ref(self, tenant_id: str, key_id: str) -> KeyRef:
        ref = self.keys.key_ref(tenant_id, key_id=key_id)
        if ref is None:
            raise KeystewardError("the external key's tenant key is gone", code="key_not_found")
        self.keys.require_enabled(ref)
        return ref

    def encrypt(self, tenant_id: str, key_id: str, plaintext: bytes, aad: bytes | None) -> EncryptResult:
        if aad is not None and len(aad) > MAX_AAD:
            raise InvalidCiphertext("additionalAuthenticatedData is larger than 8192 bytes")
        ref = self._ref(tenant_id, key_id)
        metadata = version_metadata(ref.primary_version)
        kek = self.keys.usable_kek(tenant_id, ref.id, ref.primary_version)
        blob = kek.seal(plaintext, framed_aad(aad, metadata))
        return EncryptResult(blob[NONCE_SIZE:-TAG_SIZE], blob[:NONCE_SIZE], blob[-TAG_SIZE:], metadata)

    def decrypt(self, tenant_id: str, key_id: str, result: EncryptResult, aad: bytes | None) -> bytearray:
        """The plaintext of an encrypt result (in a bytearray the caller wipes), or InvalidCiphertext."""
        version = metadata_version(result.ciphertext_metadata)
        if len(result.iv) != NONCE_SIZE or len(result.tag) != TAG_SIZE or (aad is not None and len(aad) > MAX_AAD):
            raise InvalidCiphertext("keysteward makes 12-byte IVs and 16-byte tags only")
        ref = self._ref(tenant_id, key_id)
        if version > ref.primary_version:
            raise InvalidCiphertext("the ciphertext names a key version that does not exist")
        kek = self.keys.usable_kek(tenant_id, ref.id, version)
        try:
            return kek.open(result.iv + result.ciphertext + result.tag, framed_aad(aad, result.ciphertext_metadata))
        except AuthenticationFailed as exc:
            raise InvalidCiphertext("the ciphertext, its AAD, IV, tag or metadata do not authenticate") from exc

    def probe(self) -> Probe:
        """A deep check: a database read, then a test key wrapped and unwrapped under the root key and
        used for one AES-GCM encrypt and decrypt (the test key is fresh, no tenant key is touched)."""
        started = time.perf_counter()
        try:
            with self.db.read() as conn:
                conn.execute(select(XksStore.prefix).limit(1)).first()
        except Exception:  # noqa: BLE001 - any failure of the database is what the probe reports
            return Probe(False, self.keys.root.sealed, 0.0, "the database does not answer")
        database_ms = (time.perf_counter() - started) * 1000
        if self.keys.root.sealed:
            return Probe(False, True, database_ms, "sealed")
        material = bytearray(os.urandom(32))
        try:
            root = self.keys.root.root()
            aad = b"keysteward/v1/xks-health"
            opened = root.open(root.seal(material, aad), aad)
            test = AeadKey(opened)
            opened[:] = bytes(len(opened))
            sample = os.urandom(32)
            if test.open(test.seal(sample, aad), aad) != sample:
                return Probe(False, False, database_ms, "the test encrypt and decrypt disagree")
        except KeystewardError as exc:
            return Probe(False, self.keys.root.sealed, database_ms, exc.code)
        finally:
            material[:] = bytes(len(material))
        return Probe(True, False, database_ms)
