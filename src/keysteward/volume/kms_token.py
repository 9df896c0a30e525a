"""Volumes bound to the key manager: the ``keysteward`` LUKS2 token and its keyslot.

A bound volume has one keyslot whose passphrase is a 32-byte secret that only a release of the key
manager gives (pbkdf2-sha256, 1000 iterations: the secret is random, a slow KDF adds nothing), and a
token of type ``keysteward`` naming that keyslot and where to ask for the secret (docs/release-protocol.md
section 5; like clevis, no secret in the token)::

    {"type": "keysteward", "keyslots": ["0"], "protocol": "keysteward-release/1",
     "url": "https://kms.example:8443", "tenant": "acme", "volume_id": "<uuid>", "key": "volumes", "key_version": 1}

The pure half works on :class:`~keysteward.formats.luks.Luks2Metadata`: :func:`find_token` reads and
validates the token, :func:`bind_change` adds keyslot and token, :func:`shred_change` removes both.
The I/O half (:func:`read_token`, :func:`attach_token`, :func:`bind`, :func:`shred`, :func:`verify_secret`)
reads the header and commits with :func:`~keysteward.volume.header_io.commit_luks2` (crash-safe order).
"""

from __future__ import annotations

import re
import uuid as uuid_module
from dataclasses import dataclass, replace
from typing import Any

from keysteward.crypto.secret import wipe_bytearray
from keysteward.formats import luks
from keysteward.formats.luks.luks2_json import MAX_TOKENS
from keysteward.formats.luks.luks2_model import frozen_map
from keysteward.volume.device import Device
from keysteward.volume.errors import VolumeConflict, VolumeRequestError
from keysteward.volume.header_io import VolumeHeader, commit_luks2, read_header
from keysteward.volume.kdf import KdfChoice, new_kdf_params
from keysteward.volume.luks_volume import Passphrase, unlock_header

TOKEN_TYPE = "keysteward"  # noqa: S105 - a LUKS2 token type
PROTOCOL = "keysteward-release/1"
SECRET_SIZE = 32
KEYSLOT_KDF = KdfChoice(type="pbkdf2", iterations=1000, hash="sha256")
"""The KDF of the keysteward keyslot (its passphrase is 32 random bytes)."""
URL_MAX = 2048
VERSION_MAX = 2**31 - 1

TOKEN_INVALID = "kms_token_invalid"  # noqa: S105 - error codes
NO_TOKEN = "kms_token_missing"  # noqa: S105
TOKEN_EXISTS = "kms_token_exists"  # noqa: S105

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""Tenant and key names, as the key manager allows them (identity.principal.NAME_RE)."""
_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(?::[0-9]{1,5})?(?:/[!-~]*)?")
_URLS = re.compile(rf"{_URL.pattern}(?:,{_URL.pattern})*")
"""One URL, or several key managers' URLs joined by commas (tried in turn, docs/ha.md)."""
_FIELDS = ("type", "keyslots", "protocol", "url", "tenant", "volume_id", "key", "key_version")


def _invalid(message: str) -> VolumeRequestError:
    return VolumeRequestError(message, code=TOKEN_INVALID)


@dataclass(frozen=True)
class KmsRef:
    """Where a volume's secret is released: what the token records besides its keyslot."""

    url: str
    tenant: str
    volume_id: str
    key: str
    key_version: int

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or len(self.url) > URL_MAX or not _URLS.fullmatch(self.url):
            raise _invalid(
                f"the key manager URL must be http(s) URLs (comma separated) of at most {URL_MAX} characters"
            )
        for what, value in (("tenant", self.tenant), ("key", self.key)):
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise _invalid(f"the {what} name must be 1-64 characters of a-z, 0-9, '.', '_' or '-'")
        if not isinstance(self.volume_id, str) or len(self.volume_id) != 36:
            raise _invalid("the volume id must be a UUID")
        try:
            canonical = str(uuid_module.UUID(self.volume_id))
        except ValueError:
            raise _invalid("the volume id must be a UUID") from None
        if canonical != self.volume_id:
            raise _invalid("the volume id must be a UUID in lowercase canonical form")
        version = self.key_version
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION_MAX:
            raise _invalid(f"the key version must be an integer in 1..{VERSION_MAX}")

    def with_url(self, url: str | None) -> KmsRef:
        """This reference asking another URL (``--kms`` overrides the token's)."""
        return self if url is None else replace(self, url=url.rstrip("/"))


@dataclass(frozen=True)
class KmsToken:
    """A validated ``keysteward`` token of a volume header."""

    token_id: int
    keyslot: int
    ref: KmsRef

    def to_json(self) -> dict[str, Any]:
        ref = self.ref
        return {
            "type": TOKEN_TYPE, "keyslots": [str(self.keyslot)], "protocol": PROTOCOL, "url": ref.url,
            "tenant": ref.tenant, "volume_id": ref.volume_id, "key": ref.key, "key_version": ref.key_version,
        }  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """For people and ``--json`` (a token holds no secret)."""
        return {"token": self.token_id, **self.to_json()}


# -- pure ------------------------------------------------------------------------------------------


def parse_token(token_id: int, token: luks.Luks2Token, metadata: luks.Luks2Metadata) -> KmsToken:
    """Validate one ``keysteward`` token: every field of the protocol, its type and size, and its keyslot."""
    data = token.data
    where = f"LUKS2 token {token_id} ({TOKEN_TYPE})"
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise _invalid(f"{where}: unknown fields {unknown[:5]}")
    missing = [name for name in _FIELDS if name not in data]
    if missing:
        raise _invalid(f"{where}: missing fields {missing}")
    if data["protocol"] != PROTOCOL:
        raise _invalid(f"{where}: protocol {str(data['protocol'])[:40]!r} is not {PROTOCOL}")
    if len(token.keyslots) != 1:
        raise _invalid(f"{where}: names {len(token.keyslots)} keyslots, exactly one expected")
    keyslot = token.keyslots[0]
    if keyslot not in metadata.keyslots:
        raise _invalid(f"{where}: keyslot {keyslot} is not in use")
    try:
        ref = KmsRef(data["url"], data["tenant"], data["volume_id"], data["key"], data["key_version"])
    except VolumeRequestError as exc:
        raise _invalid(f"{where}: {exc.message}") from None
    return KmsToken(token_id, keyslot, ref)


def find_token(metadata: luks.Luks2Metadata) -> KmsToken | None:
    """The volume's ``keysteward`` token (validated), None if it has none; two of them are refused."""
    found = [(n, t) for n, t in metadata.tokens.items() if t.type == TOKEN_TYPE]
    if len(found) > 1:
        raise _invalid(
            f"the header has {len(found)} {TOKEN_TYPE} tokens ({[n for n, _ in found]}), at most one allowed"
        )
    return parse_token(found[0][0], found[0][1], metadata) if found else None


def with_token(metadata: luks.Luks2Metadata, ref: KmsRef, keyslot: int) -> tuple[KmsToken, luks.Luks2Metadata]:
    """``metadata`` plus a ``keysteward`` token for ``keyslot`` (lowest free token id)."""
    if find_token(metadata) is not None:
        raise VolumeConflict(f"the volume already has a {TOKEN_TYPE} token", code=TOKEN_EXISTS)
    if keyslot not in metadata.keyslots:
        raise _invalid(f"keyslot {keyslot} is not in use")
    token_id = next((n for n in range(MAX_TOKENS) if n not in metadata.tokens), -1)
    if token_id < 0:
        raise luks.LuksFormatError(f"all {MAX_TOKENS} tokens are in use", code="luks_full")
    made = KmsToken(token_id, keyslot, ref)
    token = luks.Luks2Token(TOKEN_TYPE, (keyslot,), made.to_json())
    tokens = {**metadata.tokens, token_id: token}
    return made, replace(metadata, tokens=frozen_map(tokens))


@dataclass(frozen=True)
class BindChange:
    """A new keysteward keyslot and its token: write ``area`` first, then ``metadata``."""

    token: KmsToken
    metadata: luks.Luks2Metadata
    area: luks.Write


def bind_change(
    metadata: luks.Luks2Metadata,
    volume_key: bytes | bytearray,
    secret: bytes | bytearray,
    ref: KmsRef,
    *,
    device_size: int,
    keyslot: int | None = None,
) -> BindChange:
    """Add a keyslot holding ``volume_key`` under ``secret`` (pbkdf2-sha256, 1000 iterations) and its token."""
    if len(secret) != SECRET_SIZE:
        raise _invalid(f"a key manager secret has {SECRET_SIZE} bytes, not {len(secret)}")
    if find_token(metadata) is not None:
        raise VolumeConflict(f"the volume already has a {TOKEN_TYPE} token", code=TOKEN_EXISTS)
    params = new_kdf_params(KEYSLOT_KDF, default_type="pbkdf2", limit_kib=0)
    offset, size = luks.allocate_area(metadata, len(volume_key))
    made, area = luks.make_keyslot(volume_key, secret, kdf_params=params, area_offset=offset, area_size=size)
    slot, metadata = luks.add_keyslot(metadata, made, keyslot_id=keyslot)
    token, metadata = with_token(metadata, ref, slot)
    return BindChange(token, luks.validate_metadata(metadata, device_size=device_size), area)


@dataclass(frozen=True)
class ShredChange:
    """The keysteward keyslot and token removed: wipe the keyslot's ``area`` first, then write ``metadata``."""

    token: KmsToken
    metadata: luks.Luks2Metadata
    wipe: luks.Write
    remaining: tuple[int, ...]
    """Keyslots left; none means nothing opens the volume any more (by design of a shred)."""


def shred_change(metadata: luks.Luks2Metadata, *, device_size: int) -> ShredChange:
    """Remove the keysteward keyslot and its token, leaving a header cryptsetup still accepts."""
    token = find_token(metadata)
    if token is None:
        raise VolumeRequestError(f"the volume has no {TOKEN_TYPE} token", code=NO_TOKEN)
    changed, wipe = luks.remove_keyslot(metadata, token.keyslot)
    tokens = {n: t for n, t in changed.tokens.items() if n != token.token_id}
    changed = replace(changed, tokens=frozen_map(tokens))
    return ShredChange(token, luks.validate_metadata(changed, device_size=device_size), wipe, tuple(changed.keyslots))


# -- on a device -----------------------------------------------------------------------------------


def _luks2(header: VolumeHeader, path: str) -> luks.Luks2Metadata:
    if header.luks2 is None:
        raise VolumeRequestError(f"{path} is a LUKS1 volume: only LUKS2 volumes carry a {TOKEN_TYPE} token",
                                 code=NO_TOKEN)  # fmt: skip
    return header.luks2.metadata


def token_of(header: VolumeHeader, path: str) -> KmsToken:
    """The header's keysteward token; ``kms_token_missing`` if it has none."""
    token = find_token(_luks2(header, path))
    if token is None:
        raise VolumeRequestError(f"{path} has no {TOKEN_TYPE} token: it is not bound to a key manager", code=NO_TOKEN)
    return token


def read_token(path: str) -> KmsToken:
    """The keysteward token of the volume at ``path``."""
    with Device.open(path) as device:
        return token_of(read_header(device), path)


def attach_token(path: str, ref: KmsRef, keyslot: int) -> KmsToken:
    """Add the token for an existing keysteward ``keyslot`` (used right after create)."""
    with Device.open(path, writable=True) as device:
        header = read_header(device)
        token, metadata = with_token(_luks2(header, path), ref, keyslot)
        commit_luks2(device, header, luks.validate_metadata(metadata, device_size=device.size))
    return token


def bind(
    path: str, passphrase: Passphrase, secret: bytes | bytearray, ref: KmsRef,
    *, max_memory_kib: int | None = None,
) -> KmsToken:  # fmt: skip
    """Bind an existing LUKS2 volume: ``passphrase`` opens it, a new keyslot opens with ``secret``."""
    with Device.open(path, writable=True) as device:
        header = read_header(device)
        metadata = _luks2(header, path)
        unlocked = unlock_header(device, header, passphrase, max_memory_kib=max_memory_kib)
        try:
            change = bind_change(metadata, unlocked.volume_key, secret, ref, device_size=device.size)
        finally:
            wipe_bytearray(unlocked.volume_key)
        commit_luks2(device, header, change.metadata, before=[change.area])
    return change.token


@dataclass(frozen=True)
class Shredded:
    path: str
    keyslot: int
    token: int
    remaining_keyslots: tuple[int, ...]

    @property
    def openable(self) -> bool:
        """False when the keysteward keyslot was the only one: nothing opens the volume any more."""
        return bool(self.remaining_keyslots)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path, "removed_keyslot": self.keyslot, "removed_token": self.token,
            "remaining_keyslots": list(self.remaining_keyslots), "openable": self.openable,
        }  # fmt: skip


def shred(path: str) -> Shredded:
    """Remove the keysteward keyslot (its area wiped first) and token from the header of ``path``.

    Needs no secret. Other keyslots (a break-glass passphrase) keep working; when the keysteward
    keyslot was the only one, the volume is unopenable afterwards, by design (``openable`` False).
    """
    with Device.open(path, writable=True) as device:
        header = read_header(device)
        change = shred_change(_luks2(header, path), device_size=device.size)
        commit_luks2(device, header, change.metadata, before=[change.wipe])
    return Shredded(path, change.token.keyslot, change.token.token_id, change.remaining)


def verify_secret(path: str, token: KmsToken, secret: bytes | bytearray) -> None:
    """Raise :class:`~keysteward.formats.luks.LuksWrongPassphrase` unless ``secret`` opens the token's keyslot."""
    with Device.open(path) as device:
        unlocked = unlock_header(device, read_header(device), secret, keyslot=token.keyslot)
        wipe_bytearray(unlocked.volume_key)
