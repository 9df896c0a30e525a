"""The PKCS#11 root-key seal: a non-extractable AES-256 key inside an HSM token.

The root key is sealed with CKM_AES_GCM computed inside the token (random 12-byte IV, 128-bit tag,
caller-supplied AAD). The blob is ``iv (12) || ciphertext || tag (16)``, the layout of
:mod:`keysteward.crypto.aead`. SoftHSM2's GCM works through python-pkcs11, so there is no fallback.

PKCS#11 logs in a (process, token) pair, not a session: a second C_Login fails with
CKR_USER_ALREADY_LOGGED_IN, and C_Logout on any session logs out all of them. So the HsmKey objects
of a process share one counted login per token and each works in its own public session; the last
close logs out. While a login is held, a new HsmKey's PIN is compared with an HMAC (under a per-process
random key) of the PIN that logged in; the PIN itself is not kept.

SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR, so on decrypt GeneralError,
EncryptedDataInvalid and EncryptedDataLenRange mean :class:`AuthenticationFailed`; any other
PKCS#11 failure means :class:`Unavailable` (fail closed). python-pkcs11 takes and returns ``bytes``,
so the root key briefly exists as immutable copies that cannot be wiped.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, cast

import pkcs11
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import (
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    GeneralError,
    MultipleObjectsReturned,
    MultipleTokensReturned,
    NoSuchKey,
    NoSuchToken,
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    PKCS11Error,
)

from keysteward.crypto.aead import NONCE_SIZE, OVERHEAD, TAG_SIZE, AuthenticationFailed
from keysteward.errors import Conflict, NotFound, Unauthenticated, Unavailable

_KEY_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
}
_AUTH_FAILURES = (GeneralError, EncryptedDataInvalid, EncryptedDataLenRange)


class _GcmKey(Protocol):
    def encrypt(self, data: bytes, **kwargs: Any) -> bytes: ...
    def decrypt(self, data: bytes, **kwargs: Any) -> bytes: ...


@dataclass
class _Login:
    session: pkcs11.Session
    pin_mac: bytes
    users: int = 1


_LoginKey = tuple[str, bytes]  # (module path, token serial)
_LOGINS: dict[_LoginKey, _Login] = {}
_LOGINS_LOCK = threading.Lock()
_PIN_MAC_KEY = os.urandom(32)


def _gcm(iv: bytes, aad: bytes) -> dict[str, Any]:
    return {"mechanism": Mechanism.AES_GCM, "mechanism_param": GCMParams(iv, aad, TAG_SIZE * 8)}


def _unavailable(what: str) -> Unavailable:
    return Unavailable(f"the HSM failed: {what}", code="hsm_unavailable")


def _find_token(module_path: str, token_label: str) -> pkcs11.Token:
    try:
        lib = pkcs11.lib(module_path)
    except (PKCS11Error, OSError) as exc:
        raise Unavailable(f"PKCS#11 module does not load: {exc}", code="hsm_unavailable") from exc
    try:
        return lib.get_token(token_label=token_label)
    except NoSuchToken as exc:
        raise NotFound(f"no PKCS#11 token labelled {token_label!r}", code="hsm_token_not_found") from exc
    except MultipleTokensReturned as exc:
        raise Conflict(f"several tokens labelled {token_label!r}", code="hsm_token_ambiguous") from exc
    except PKCS11Error as exc:
        raise _unavailable("listing tokens") from exc


def _acquire_login(module_path: str, token: pkcs11.Token, pin: str) -> _LoginKey:
    key = (module_path, token.serial)
    pin_mac = hmac.new(_PIN_MAC_KEY, pin.encode(), hashlib.sha256).digest()
    incorrect = Unauthenticated(f"the PIN for token {token.label!r} is incorrect", code="hsm_pin_incorrect")
    with _LOGINS_LOCK:
        login = _LOGINS.get(key)
        if login is not None:
            if not hmac.compare_digest(login.pin_mac, pin_mac):
                raise incorrect
            login.users += 1
            return key
        try:
            session = token.open(user_pin=pin)
        except (PinIncorrect, PinInvalid, PinLenRange) as exc:
            raise incorrect from exc
        except PinLocked as exc:
            raise Unauthenticated(f"token {token.label!r}: PIN locked", code="hsm_pin_locked") from exc
        except PKCS11Error as exc:
            raise _unavailable("logging in") from exc
        _LOGINS[key] = _Login(session, pin_mac)
        return key


def _release_login(key: _LoginKey) -> None:
    with _LOGINS_LOCK:
        login = _LOGINS.get(key)
        if login is None:
            return
        login.users -= 1
        if login.users > 0:
            return
        del _LOGINS[key]
    with contextlib.suppress(PKCS11Error):  # already gone: token removed or module finalised
        login.session.close()


class HsmKey:
    """A non-extractable AES-256 key inside a PKCS#11 token that seals the root key."""

    _key: _GcmKey | None
    _session: pkcs11.Session | None
    _login: _LoginKey | None

    def __init__(self, module_path: str, token_label: str, key_label: str, pin: str) -> None:
        session = self._open(module_path, token_label, key_label, pin, False)
        try:
            found = session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label=key_label)
        except NoSuchKey as exc:
            self.close()
            raise NotFound(f"no AES key labelled {key_label!r}", code="hsm_key_not_found") from exc
        except MultipleObjectsReturned as exc:
            self.close()
            raise Conflict(f"several keys labelled {key_label!r}", code="hsm_key_ambiguous") from exc
        except PKCS11Error as exc:
            self.close()
            raise _unavailable("finding the key") from exc
        self._key = cast(_GcmKey, found)

    @classmethod
    def create(cls, module_path: str, token_label: str, key_label: str, pin: str) -> HsmKey:
        self = cls.__new__(cls)
        session = self._open(module_path, token_label, key_label, pin, True)
        try:
            if list(session.get_objects({Attribute.LABEL: key_label})):
                raise Conflict(f"the token already holds {key_label!r}", code="hsm_key_exists")
            key = session.generate_key(
                KeyType.AES,
                256,
                label=key_label,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template=_KEY_TEMPLATE,
            )
        except PKCS11Error as exc:
            self.close()
            raise _unavailable("generating the key") from exc
        except BaseException:
            self.close()
            raise
        self._key = cast(_GcmKey, key)
        return self

    def _open(self, module_path: str, token_label: str, key_label: str, pin: str, rw: bool) -> pkcs11.Session:
        self._names = f"token={token_label!r} key={key_label!r}"
        self._key = self._session = self._login = None
        token = _find_token(module_path, token_label)
        self._login = _acquire_login(module_path, token, pin)
        try:
            self._session = token.open(rw=rw)  # public session; it shares the token login
        except PKCS11Error as exc:
            self.close()
            raise _unavailable("opening a session") from exc
        return self._session

    def _require_key(self) -> _GcmKey:
        if self._key is None:
            raise ValueError("HsmKey is closed")
        return self._key

    def seal(self, plaintext: bytes | bytearray, aad: bytes) -> bytes:
        key = self._require_key()
        iv = os.urandom(NONCE_SIZE)
        try:
            return iv + key.encrypt(bytes(plaintext), **_gcm(iv, aad))
        except PKCS11Error as exc:
            raise _unavailable("sealing") from exc

    def unseal(self, blob: bytes, aad: bytes) -> bytearray:
        key = self._require_key()
        if len(blob) < OVERHEAD:
            raise AuthenticationFailed("sealed blob too short")
        data = bytes(blob)
        try:
            return bytearray(key.decrypt(data[NONCE_SIZE:], **_gcm(data[:NONCE_SIZE], aad)))
        except _AUTH_FAILURES as exc:
            raise AuthenticationFailed("sealed blob does not authenticate under this HSM key") from exc
        except PKCS11Error as exc:
            raise _unavailable("unsealing") from exc

    def close(self) -> None:
        session, login = self._session, self._login
        self._key = self._session = self._login = None
        if session is not None:
            with contextlib.suppress(PKCS11Error):
                session.close()
        if login is not None:
            _release_login(login)

    def __enter__(self) -> HsmKey:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._key is not None else "closed"
        return f"<HsmKey {self._names} {state}>"
