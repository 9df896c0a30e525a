"""KMIP Encrypt and Decrypt with a managed AES key, as actions of the access path (``kmip.encrypt``,
``kmip.decrypt``; Cedar ``kmip_encrypt``, ``kmip_decrypt`` on the ``KmipObject``).

They deliver :attr:`Delivery.OPERATION`: after the policy's permit the key is unwrapped, used and wiped in
``perform``; only the result leaves, after its audit record is committed. The key must be Active (KMIP's
rule for cryptographic use). Modes: AES-GCM (a 12-byte IV the server draws unless given, a 16-byte tag,
additional data bound) and AES-CBC with PKCS#5 padding (a 16-byte IV the server draws unless given).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keysteward.access.actions import ActionTable, Subject
from keysteward.access.kmip_actions import KmipInputs, _KmipAction
from keysteward.access.kmip_attributes import Attributes
from keysteward.access.request import Delivery
from keysteward.errors import BadRequest, Conflict
from keysteward.keys.kmip_objects import KmipObjects

MAX_DATA = 65536
AES = 3  # Cryptographic Algorithm AES


@dataclass(frozen=True, repr=False)
class CryptoRequest:
    mode: str
    """``GCM`` or ``CBC`` (with PKCS#5 padding)."""
    data: bytes
    iv: bytes | None = None
    aad: bytes = b""
    tag: bytes | None = None
    """Decrypt with GCM: the authentication tag."""


@dataclass(frozen=True, repr=False)
class CryptoResult:
    data: bytes
    iv: bytes | None = None
    """The IV the server drew (None when the client gave one)."""
    tag: bytes | None = None


class _KmipCrypto(_KmipAction):
    delivery = Delivery.OPERATION
    warm_delivery = False  # perform reads the wrapped material

    def perform(self, subject: Subject) -> Any:
        state = subject.state
        record = state.record
        if record.state != "Active":
            raise Conflict(f"only an active key is used, not a {record.state} one", code="kmip_wrong_state")
        algorithm = Attributes.from_json(record.attributes).first("Cryptographic Algorithm")
        if record.object_type != "SymmetricKey" or algorithm is None or algorithm.value != AES:
            raise BadRequest("Encrypt and Decrypt use AES keys", code="kmip_invalid_field")
        request: CryptoRequest = state.inputs.crypto
        key = self.objects.material(record)
        try:
            result = self.run(key.view(), request)
        except ValueError:  # an IV or tag of the wrong size
            raise BadRequest("the IV/Counter/Nonce or the tag has the wrong size", code="kmip_invalid_field") from None
        finally:
            key.wipe()
        subject.details.update(mode=request.mode, bytes=len(request.data))
        return result

    def run(self, key: memoryview, request: CryptoRequest) -> CryptoResult:
        raise NotImplementedError

    def deliver(self, subject: Subject, booked: Any, performed: Any) -> Any:
        return performed


class KmipEncrypt(_KmipCrypto):
    action, cedar_action = "kmip.encrypt", "kmip_encrypt"

    def run(self, key: memoryview, request: CryptoRequest) -> CryptoResult:
        if request.mode == "GCM":
            iv = request.iv or os.urandom(12)
            sealed = AESGCM(key).encrypt(iv, request.data, request.aad or None)
            return CryptoResult(sealed[:-16], None if request.iv else iv, sealed[-16:])
        iv = request.iv or os.urandom(16)
        padder = padding.PKCS7(128).padder()
        padded = padder.update(request.data) + padder.finalize()
        encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        return CryptoResult(encryptor.update(padded) + encryptor.finalize(), None if request.iv else iv)


class KmipDecrypt(_KmipCrypto):
    action, cedar_action = "kmip.decrypt", "kmip_decrypt"

    def run(self, key: memoryview, request: CryptoRequest) -> CryptoResult:
        if request.iv is None:
            raise BadRequest("Decrypt needs the IV/Counter/Nonce", code="kmip_missing_data")
        if request.mode == "GCM":
            if request.tag is None:
                raise BadRequest("Decrypt with GCM needs the authentication tag", code="kmip_missing_data")
            try:
                return CryptoResult(AESGCM(key).decrypt(request.iv, request.data + request.tag, request.aad or None))
            except InvalidTag:
                raise BadRequest("the data does not authenticate", code="kmip_crypto_failure") from None
        try:
            decryptor = Cipher(algorithms.AES(key), modes.CBC(request.iv)).decryptor()
            padded = decryptor.update(request.data) + decryptor.finalize()
            unpadder = padding.PKCS7(128).unpadder()
            return CryptoResult(unpadder.update(padded) + unpadder.finalize())
        except ValueError:
            raise BadRequest("the data does not decrypt", code="kmip_crypto_failure") from None


def register(table: ActionTable, objects: KmipObjects) -> None:
    for handler in (KmipEncrypt, KmipDecrypt):
        table.register(handler(objects))


__all__ = ["CryptoRequest", "CryptoResult", "KmipInputs", "register"]
