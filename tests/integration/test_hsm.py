"""The PKCS#11 root-key seal against a real SoftHSM2 token."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from keysteward.crypto.aead import NONCE_SIZE, OVERHEAD, AuthenticationFailed
from keysteward.errors import Conflict, KeystewardError, NotFound, Unauthenticated, Unavailable
from keysteward.keys.hsm import HsmKey
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = pytest.mark.integration

KEY = "keysteward-root-seal"
AAD = b"keysteward|root|v1"


def create(t: SoftHsmToken, key_label: str = KEY) -> HsmKey:
    return HsmKey.create(t.module_path, t.token_label, key_label, t.pin)


def open_key(t: SoftHsmToken, key_label: str = KEY) -> HsmKey:
    return HsmKey(t.module_path, t.token_label, key_label, t.pin)


def messages(exc: BaseException) -> str:
    """Everything an error would show: its message, repr, diagnostics and the chained causes."""
    parts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None:
        parts += [str(cur), repr(cur)]
        if isinstance(cur, KeystewardError):
            parts.append(cur.diagnostics())
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


def test_seal_unseal_round_trip(softhsm: SoftHsmToken) -> None:
    root = bytearray(os.urandom(32))
    with create(softhsm) as key:
        blob = key.seal(root, AAD)
        assert len(blob) == OVERHEAD + len(root)
        assert bytes(root) not in blob
        assert key.seal(root, AAD)[:NONCE_SIZE] != blob[:NONCE_SIZE]  # fresh random IV
        opened = key.unseal(blob, AAD)
    assert isinstance(opened, bytearray)
    assert opened == root


def test_key_is_not_extractable(softhsm: SoftHsmToken) -> None:
    create(softhsm).close()
    token = pkcs11.lib(softhsm.module_path).get_token(token_label=softhsm.token_label)
    with token.open(rw=True, user_pin=softhsm.pin) as session:
        key = session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label=KEY)
        assert key[Attribute.TOKEN] and key[Attribute.PRIVATE] and key[Attribute.SENSITIVE]
        assert key[Attribute.VALUE_LEN] == 32
        assert not key[Attribute.EXTRACTABLE]
        assert key[Attribute.NEVER_EXTRACTABLE] and key[Attribute.ALWAYS_SENSITIVE]
        assert key[Attribute.ENCRYPT] and key[Attribute.DECRYPT]
        for attr in (Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN, Attribute.VERIFY, Attribute.DERIVE):
            assert not key[attr], attr
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
        wrapper: Any = session.generate_key(KeyType.AES, 256, capabilities=pkcs11.MechanismFlag.WRAP)
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            wrapper.wrap_key(key, mechanism=pkcs11.Mechanism.AES_KEY_WRAP)
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            key[Attribute.EXTRACTABLE] = True
        assert not key[Attribute.EXTRACTABLE]


def test_wrong_pin(softhsm: SoftHsmToken) -> None:
    create(softhsm).close()
    wrong = "wrong-" + softhsm.pin
    with pytest.raises(Unauthenticated) as caught:
        HsmKey(softhsm.module_path, softhsm.token_label, KEY, wrong)
    assert caught.value.code == "hsm_pin_incorrect"
    assert wrong not in messages(caught.value) and softhsm.pin not in messages(caught.value)


def test_wrong_pin_while_another_key_is_logged_in(softhsm: SoftHsmToken) -> None:
    with create(softhsm) as key:
        with pytest.raises(Unauthenticated) as caught:
            HsmKey(softhsm.module_path, softhsm.token_label, KEY, "wrong-" + softhsm.pin)
        assert caught.value.code == "hsm_pin_incorrect"
        assert key.unseal(key.seal(b"still works", AAD), AAD) == b"still works"


def test_unknown_token(softhsm: SoftHsmToken) -> None:
    with pytest.raises(NotFound) as caught:
        HsmKey(softhsm.module_path, "no-such-token", KEY, softhsm.pin)
    assert caught.value.code == "hsm_token_not_found"
    assert softhsm.pin not in messages(caught.value)


def test_unknown_key_label(softhsm: SoftHsmToken) -> None:
    create(softhsm).close()
    with pytest.raises(NotFound) as caught:
        open_key(softhsm, "no-such-key")
    assert caught.value.code == "hsm_key_not_found"
    assert softhsm.pin not in messages(caught.value)
    with open_key(softhsm) as key:  # the failed attempt released its login
        assert key.unseal(key.seal(b"x", AAD), AAD) == b"x"


def test_module_that_does_not_load(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    with pytest.raises(Unavailable) as caught:
        HsmKey(str(tmp_path / "libnothere.so"), softhsm.token_label, KEY, softhsm.pin)
    assert caught.value.code == "hsm_unavailable"
    assert softhsm.pin not in messages(caught.value)


def test_create_twice_conflicts(softhsm: SoftHsmToken) -> None:
    with create(softhsm) as first:
        blob = first.seal(b"root", AAD)
        with pytest.raises(Conflict) as caught:
            create(softhsm)
        assert caught.value.code == "hsm_key_exists"
    with pytest.raises(Conflict):
        create(softhsm)
    with open_key(softhsm) as key:
        assert key.unseal(blob, AAD) == b"root"  # the refused create changed nothing


@pytest.mark.parametrize("index", [0, NONCE_SIZE, NONCE_SIZE + 16, -1], ids=["iv", "ct", "ct-end", "tag"])
def test_tampered_blob(softhsm: SoftHsmToken, index: int) -> None:
    with create(softhsm) as key:
        blob = bytearray(key.seal(os.urandom(32), AAD))
        blob[index] ^= 0x01
        with pytest.raises(AuthenticationFailed):
            key.unseal(bytes(blob), AAD)


@pytest.mark.parametrize("length", [0, NONCE_SIZE, OVERHEAD - 1, OVERHEAD, OVERHEAD + 31])
def test_truncated_blob(softhsm: SoftHsmToken, length: int) -> None:
    with create(softhsm) as key:
        blob = key.seal(os.urandom(32), AAD)
        with pytest.raises(AuthenticationFailed):
            key.unseal(blob[:length], AAD)


def test_wrong_aad(softhsm: SoftHsmToken) -> None:
    with create(softhsm) as key:
        blob = key.seal(os.urandom(32), AAD)
        for aad in (b"", AAD + b"x", AAD[:-1]):
            with pytest.raises(AuthenticationFailed):
                key.unseal(blob, aad)


def test_second_object_unseals(softhsm: SoftHsmToken) -> None:
    root = os.urandom(32)
    first = create(softhsm)
    blob = first.seal(root, AAD)
    second = open_key(softhsm)  # a new session while the first is still open
    assert second.unseal(blob, AAD) == root
    first.close()  # closing one object must not log the other out
    assert second.unseal(blob, AAD) == root
    second.close()
    with open_key(softhsm) as third:  # a fresh login after everything was closed
        assert third.unseal(blob, AAD) == root


def test_other_tokens_key_does_not_unseal(softhsm: SoftHsmToken) -> None:
    other = softhsm.add_token("ks-test-other")
    with create(softhsm) as ours, create(other) as theirs:
        blob = ours.seal(os.urandom(32), AAD)
        with pytest.raises(AuthenticationFailed):
            theirs.unseal(blob, AAD)
        assert theirs.unseal(theirs.seal(b"theirs", AAD), AAD) == b"theirs"


def test_close_is_idempotent_and_repr_has_no_secrets(softhsm: SoftHsmToken) -> None:
    key = create(softhsm)
    assert softhsm.pin not in repr(key)
    key.close()
    key.close()
    with pytest.raises(ValueError, match="closed"):
        key.seal(b"x", AAD)
    assert "closed" in repr(key)
