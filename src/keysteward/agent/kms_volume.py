"""Volumes whose keyslot secret the key manager creates and holds.

- :func:`create_kms_volume`: register the volume (``POST /v1/volumes``, admin token), then create the
  LUKS2 volume with the released secret as keyslot 0's passphrase (pbkdf2-sha256, 1000 iterations), its
  ``keysteward`` token, and optionally a break-glass passphrase keyslot (default KDF, argon2id). If the
  volume cannot be made after the registration, the registration is destroyed (best effort, and said
  in the error).
- :func:`kms_passphrase`: the key source of ``keysteward volume read/write/check --kms URL``: a release
  of the secret of the volume at PATH, handed out as a bytearray that is wiped after, and the lease
  ended cleanly so that the instance's agent (or another tool) can take the volume right after.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from keysteward.agent.client import AgentClient
from keysteward.agent.unlock import UnlockOptions, release_for
from keysteward.crypto.hpke import X25519
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import KeystewardError
from keysteward.volume.create import CreateOptions, create_volume
from keysteward.volume.kdf import KdfChoice
from keysteward.volume.keyslots import add_key
from keysteward.volume.kms_token import KEYSLOT_KDF, SECRET_SIZE, KmsRef, attach_token, read_token


@dataclass(frozen=True)
class KmsVolumeSpec:
    """What the key manager records about a new volume (docs/release-protocol.md section 6)."""

    url: str
    key: str
    provider: str | None = None
    account: str | None = None
    host: str | None = None
    name: str | None = None
    instance_id: str | None = None
    image_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    lease_seconds: int | None = None
    renew_seconds: int | None = None
    grace_seconds: int | None = None
    suite: str = X25519

    def request(self, default_name: str) -> dict[str, Any]:
        fields = ("provider", "account", "instance_id", "image_id", "host")
        binding = {k: getattr(self, k) for k in fields if getattr(self, k)}
        body: dict[str, Any] = {"name": self.name or default_name, "key": self.key, "labels": dict(self.labels),
                                "binding": binding}  # fmt: skip
        for name in ("lease_seconds", "renew_seconds", "grace_seconds"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body


def _note(exc: BaseException, note: str) -> None:
    if isinstance(exc, KeystewardError):
        exc.message = f"{exc.message} ({note})"
        exc.args = (exc.message,)
    else:
        exc.add_note(note)


def create_kms_volume(
    path: str,
    spec: KmsVolumeSpec,
    options: CreateOptions,
    *,
    admin_token: str,
    ca_file: str | None = None,
    break_glass: bytearray | None = None,
    break_glass_kdf: KdfChoice | None = None,
    max_memory_kib: int | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Register and create a bound volume at ``path`` (see the module doc); returns what to report."""
    if options.luks1:
        raise KeystewardError(
            "volumes bound to the key manager are LUKS2 (the token needs LUKS2)", code="volume_option"
        )
    options = CreateOptions(
        size=options.size, sector_size=options.sector_size, key_bits=options.key_bits, kdf=KEYSLOT_KDF,
        label=options.label, force=options.force,
    )  # fmt: skip
    existed = os.path.lexists(path)
    with AgentClient(spec.url, ca_file=ca_file, token=admin_token, timeout=timeout) as client:
        registered = client.register_volume(spec.request(os.path.basename(path)), suite=spec.suite)
        secret = bytearray(registered.secret.view())
        registered.secret.wipe()
        made = None
        try:
            if len(secret) != SECRET_SIZE:
                raise KeystewardError(f"the key manager sent a {len(secret)}-byte secret", code="kms_protocol")
            volume = registered.volume
            ref = KmsRef(spec.url.rstrip("/"), str(volume["tenant"]), registered.id, spec.key,
                         int(volume.get("key_version") or 1))  # fmt: skip
            made = create_volume(path, secret, options, max_memory_kib=max_memory_kib)
            token = attach_token(path, ref, made.keyslot)
            break_glass_slot = None
            if break_glass is not None:
                added = add_key(path, secret, break_glass, kdf=break_glass_kdf, max_memory_kib=max_memory_kib)
                break_glass_slot = added.keyslot
        except BaseException as exc:
            if made is not None and not existed:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            try:
                client.destroy_volume(registered.id)
                _note(exc, f"the key manager's registration of volume {registered.id} was destroyed")
            except KeystewardError as cleanup:
                _note(exc, f"destroying the registration of volume {registered.id} failed too: {cleanup.code}")
            raise
        finally:
            wipe_bytearray(secret)
    return {
        "path": made.path, "uuid": made.uuid, "payload_size": made.payload_size, "sector_size": made.sector_size,
        "key_bits": made.key_bits, "volume": registered.volume, "token": token.describe(),
        "kms_keyslot": token.keyslot, "break_glass_keyslot": break_glass_slot, "new_file": made.new_file,
    }  # fmt: skip


@contextlib.contextmanager
def kms_passphrase(path: str, options: UnlockOptions) -> Iterator[bytearray]:
    """The secret of the volume at ``path``, released by the key manager its token (or ``options.kms_url``)
    names; wiped on exit, and the lease ended."""
    token = read_token(path)
    url = token.ref.with_url(options.kms_url).url
    with options.client(url) as client:
        released = release_for(token, options, client=client)
        secret = bytearray(released.secret.view())
        released.secret.wipe()
        try:
            yield secret
        finally:
            wipe_bytearray(secret)
            try:
                client.end(released.lease)
            except KeystewardError:
                pass  # the lease runs out on its own
            released.lease.wipe()
