"""KMIP Encrypt and Decrypt with a managed AES key, as actions of the access path (``kmip.encrypt``,
``kmip.decrypt``; Cedar ``kmip_encrypt``, ``kmip_decrypt`` on the ``KmipObject``).

They deliver :attr:`Delivery.OPERATION`: after the policy's permit the key is unwrapped, used and wiped in
``perform``; only the result leaves, after its audit record is committed. The key must be Active (KMIP's
rule for cryptographic use). Modes: AES-GCM (a 12-byte IV the server draws unless given, a 16-byte tag,
additional data bound) and AES-CBC with PKCS#5 padding (a 16-byte IV the server draws unless given).
"""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from sqlalchemy import Connection

from keysteward.access.actions import ActionTable, Subject
from keysteward.access.kmip_actions import KmipInputs, _KmipAction
from keysteward.access.kmip_attributes import Attributes, parsed
from keysteward.access.request import Delivery
from keysteward.errors import BadRequest, Conflict, Denied
from keysteward.formats.kmip_enums import (
    BLOCK_CIPHER_MODE,
    CRYPTOGRAPHIC_ALGORITHM,
    CRYPTOGRAPHIC_USAGE_MASK,
    PADDING_METHOD,
)
from keysteward.formats.kmip_tags import TAGS
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.keys.kmip_objects import KmipObjects

MAX_DATA = 65536
AES = 3  # Cryptographic Algorithm AES
USAGE_BYTE = 1
"""Usage Limits Unit Byte (Object, 2, counts operations)."""
_ALGORITHMS = {AES: "AES", CRYPTOGRAPHIC_ALGORITHM["Chacha20"]: "CHACHA20",
               CRYPTOGRAPHIC_ALGORITHM["Chacha20Poly1305"]: "CHACHA20POLY1305"}  # fmt: skip


@dataclass(frozen=True, repr=False)
class CryptoRequest:
    mode: str
    """``GCM``, ``CBC`` or ``ECB``."""
    data: bytes
    iv: bytes | None = None
    aad: bytes = b""
    tag: bytes | None = None
    """Decrypt with GCM: the authentication tag."""
    padded: bool = True
    """CBC and ECB: PKCS#5 padding (else the data is whole blocks)."""
    tag_length: int = 16
    """Encrypt with GCM: the tag's bytes (12 to 16)."""
    explicit: bool = True
    """Whether the request named its Cryptographic Parameters; else the key's own attribute decides."""


_CBC, _ECB, _GCM, _AEAD = (BLOCK_CIPHER_MODE[n] for n in ("Cbc", "Ecb", "Gcm", "Aead"))
_PKCS5, _NONE = PADDING_METHOD["Pkcs5"], PADDING_METHOD["None"]


def parameters(params: Item | None) -> tuple[str, bool, int]:
    """Cryptographic Parameters as (mode, PKCS#5 padded, GCM tag bytes); BadRequest for what is not served.

    GCM is the default; CBC pads unless told not to (as served before), ECB only when told."""
    if params is None:
        return "GCM", True, 16
    if params.type is not ItemType.STRUCTURE:
        raise BadRequest("Cryptographic Parameters is a structure", code="kmip_invalid_field")
    block, pad, tag = params.first("BlockCipherMode"), params.first("PaddingMethod"), params.first("TagLength")
    mode, padded, tag_length = "GCM", True, 16
    if block is not None and block.value in (_CBC, _ECB):
        mode = "CBC" if block.value == _CBC else "ECB"
        padded = mode == "CBC" if pad is None else pad.value == _PKCS5
        if pad is not None and pad.value not in (_PKCS5, _NONE):
            raise BadRequest("CBC and ECB are served with PKCS#5 padding or none", code="kmip_invalid_field")
    elif block is not None and block.value == _AEAD:
        mode = "AEAD"
    elif block is not None and block.value != _GCM:
        raise BadRequest("the block cipher modes served are GCM, CBC, ECB and AEAD", code="kmip_invalid_field")
    if tag is not None:
        if tag.type is not ItemType.INTEGER or not isinstance(tag.value, int) or not 12 <= tag.value <= 16:
            raise BadRequest("the Tag Length is 12 to 16 bytes", code="kmip_tag_length")
        tag_length = tag.value
    return mode, padded, tag_length


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
        held = parsed(record.attributes)  # shared: only read here
        algorithm = held.first("Cryptographic Algorithm")
        if record.object_type != "SymmetricKey" or algorithm is None or algorithm.value not in _ALGORITHMS:
            raise BadRequest(
                "Encrypt and Decrypt use AES, ChaCha20 and ChaCha20-Poly1305 keys", code="kmip_invalid_field"
            )
        self.usable(held)
        request: CryptoRequest = state.inputs.crypto
        stored = held.first("Cryptographic Parameters")
        if not request.explicit and stored is not None:
            mode, padded, tag_length = parameters(stored)
            request = replace(request, mode=mode, padded=padded, tag_length=tag_length)
        if algorithm.value != AES:  # the key's algorithm is the mode; AEAD with an AES key is GCM
            request = replace(request, mode=_ALGORITHMS[int(algorithm.value)])
        elif request.mode == "AEAD":
            request = replace(request, mode="GCM")
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

    mask_bit = 0
    date_rule = ("", False)
    """(date attribute, whether it must be past): Encrypt stops at Protect Stop Date, Decrypt waits for Process
    Start Date (KMIP)."""

    def usable(self, held: Attributes) -> None:
        """KMIP's rules on a key's usage mask (when it has one) and its protect/process dates."""
        mask = held.first("Cryptographic Usage Mask")
        if mask is not None and isinstance(mask.value, int) and not mask.value & self.mask_bit:
            raise Conflict("the key's Cryptographic Usage Mask does not allow this", code="kmip_usage_mask")
        name, must_be_past = self.date_rule
        date = held.first(name)
        if date is not None and isinstance(date.value, int) and (date.value <= time.time()) != must_be_past:
            raise Conflict(f"the key's {name} forbids this use now", code="kmip_wrong_state")

    def deliver(self, subject: Subject, booked: Any, performed: Any) -> Any:
        return performed


class KmipEncrypt(_KmipCrypto):
    action, cedar_action = "kmip.encrypt", "kmip_encrypt"
    mask_bit = CRYPTOGRAPHIC_USAGE_MASK["Encrypt"]
    date_rule = ("Protect Stop Date", False)

    def apply(self, conn: Connection, subject: Subject, state: Any, now: datetime) -> Any:
        """Usage Limits (KMIP): what the key may still protect, counted down in the transaction of the audit
        record; an Encrypt past it is refused (and its result, already computed, is never delivered)."""
        record = state.record
        held = Attributes.from_json(record.attributes)
        limits = held.first("Usage Limits")
        if limits is None:
            return record
        total, count, unit = (limits.first(n) for n in ("UsageLimitsTotal", "UsageLimitsCount", "UsageLimitsUnit"))
        left = count.value if count is not None else total.value if total is not None else None
        if not isinstance(left, int):
            return record
        spent = len(state.inputs.crypto.data) if unit is None or unit.value == USAGE_BYTE else 1
        if spent > left:
            raise Denied("the key's Usage Limits are spent", code="kmip_usage_limit")
        remaining = Item(TAGS["UsageLimitsCount"], ItemType.LONG_INTEGER, left - spent)
        kept = tuple(i for i in limits.items if i.tag != TAGS["UsageLimitsCount"])
        updated = Item(limits.tag, limits.type, (*kept, remaining))
        held.set("Usage Limits", updated)
        record.attributes = held.to_json()
        self.objects.save(conn, record, now)
        subject.details["usage_left"] = left - spent
        return record

    def run(self, key: memoryview, request: CryptoRequest) -> CryptoResult:
        if request.mode.startswith("CHACHA20"):
            return chacha_encrypt(key, request)
        if request.mode == "GCM":
            iv = request.iv or os.urandom(12)
            sealed = AESGCM(key).encrypt(iv, request.data, request.aad or None)
            return CryptoResult(
                sealed[:-16], None if request.iv else iv, sealed[-16 : len(sealed) - 16 + request.tag_length]
            )
        data = request.data
        if request.padded:
            padder = padding.PKCS7(128).padder()
            data = padder.update(data) + padder.finalize()
        elif len(data) % 16:
            raise BadRequest("without padding the data is whole 16-byte blocks", code="kmip_invalid_field")
        if request.mode == "ECB":
            encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - the client asked for it
            return CryptoResult(encryptor.update(data) + encryptor.finalize())
        iv = request.iv or os.urandom(16)
        encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        return CryptoResult(encryptor.update(data) + encryptor.finalize(), None if request.iv else iv)


class KmipDecrypt(_KmipCrypto):
    action, cedar_action = "kmip.decrypt", "kmip_decrypt"
    mask_bit = CRYPTOGRAPHIC_USAGE_MASK["Decrypt"]
    date_rule = ("Process Start Date", True)

    def run(self, key: memoryview, request: CryptoRequest) -> CryptoResult:
        if request.iv is None and request.mode != "ECB":
            raise BadRequest("Decrypt needs the IV/Counter/Nonce", code="kmip_missing_iv")
        if request.mode.startswith("CHACHA20"):
            return chacha_decrypt(key, request)
        if request.mode == "GCM":
            assert request.iv is not None
            if request.tag is None:
                raise BadRequest("Decrypt with GCM needs the authentication tag", code="kmip_missing_data")
            if not 12 <= len(request.tag) <= 16:
                raise BadRequest("the GCM tag is 12 to 16 bytes", code="kmip_invalid_field")
            try:
                opener = Cipher(algorithms.AES(key), modes.GCM(request.iv, request.tag, len(request.tag))).decryptor()
                opener.authenticate_additional_data(request.aad)
                return CryptoResult(opener.update(request.data) + opener.finalize())
            except InvalidTag:
                raise BadRequest("the data does not authenticate", code="kmip_crypto_failure") from None
        try:
            mode = modes.ECB() if request.mode == "ECB" else modes.CBC(request.iv or b"")  # noqa: S305
            decryptor = Cipher(algorithms.AES(key), mode).decryptor()
            data = decryptor.update(request.data) + decryptor.finalize()
            if request.padded:
                unpadder = padding.PKCS7(128).unpadder()
                data = unpadder.update(data) + unpadder.finalize()
            return CryptoResult(data)
        except ValueError:
            raise BadRequest("the data does not decrypt", code="kmip_crypto_failure") from None


def _chacha_nonce(iv: bytes) -> bytes:
    """ChaCha20's 16-byte counter and nonce for a KMIP IV of 12 bytes (RFC 8439) or 8 bytes (the original
    64-bit nonce), the block counter starting at 0."""
    if len(iv) not in (8, 12):
        raise BadRequest("a ChaCha20 IV/Counter/Nonce is 8 or 12 bytes", code="kmip_invalid_field")
    return bytes(16 - len(iv)) + iv


def chacha_encrypt(key: memoryview, request: CryptoRequest) -> CryptoResult:
    iv = request.iv or os.urandom(12)
    drawn = None if request.iv else iv
    if request.mode == "CHACHA20POLY1305":
        if len(iv) != 12:
            raise BadRequest("ChaCha20-Poly1305 takes a 12-byte nonce", code="kmip_invalid_field")
        sealed = ChaCha20Poly1305(bytes(key)).encrypt(iv, request.data, request.aad or None)
        return CryptoResult(sealed[:-16], drawn, sealed[-16:][: request.tag_length])
    encryptor = Cipher(algorithms.ChaCha20(key, _chacha_nonce(iv)), None).encryptor()
    return CryptoResult(encryptor.update(request.data) + encryptor.finalize(), drawn)


def chacha_decrypt(key: memoryview, request: CryptoRequest) -> CryptoResult:
    assert request.iv is not None
    if request.mode == "CHACHA20POLY1305":
        if request.tag is None or not 12 <= len(request.tag) <= 16 or len(request.iv) != 12:
            raise BadRequest(
                "ChaCha20-Poly1305 takes a 12-byte nonce and a 12 to 16-byte tag", code="kmip_invalid_field"
            )
        if len(request.tag) == 16:
            try:
                return CryptoResult(ChaCha20Poly1305(bytes(key)).decrypt(request.iv, request.data + request.tag,
                                                                         request.aad or None))  # fmt: skip
            except InvalidTag:
                raise BadRequest("the data does not authenticate", code="kmip_crypto_failure") from None
        # a truncated tag: decrypt (RFC 8439: the data starts at block 1), recompute the tag, compare its prefix;
        # the plaintext is answered only when they match
        stream = Cipher(algorithms.ChaCha20(key, b"\x01" + bytes(3) + request.iv), None).decryptor()
        plain = stream.update(request.data) + stream.finalize()
        tag = ChaCha20Poly1305(bytes(key)).encrypt(request.iv, plain, request.aad or None)[-16:]
        if not hmac.compare_digest(tag[: len(request.tag)], request.tag):
            raise BadRequest("the data does not authenticate", code="kmip_crypto_failure")
        return CryptoResult(plain)
    decryptor = Cipher(algorithms.ChaCha20(key, _chacha_nonce(request.iv)), None).decryptor()
    return CryptoResult(decryptor.update(request.data) + decryptor.finalize())


def register(table: ActionTable, objects: KmipObjects) -> None:
    for handler in (KmipEncrypt, KmipDecrypt):
        table.register(handler(objects))


__all__ = ["CryptoRequest", "CryptoResult", "KmipInputs", "register"]
