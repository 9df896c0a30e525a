"""The host agent's side of the VM routes (docs/hosts.md): orders, reports, VM releases, snapshot permits.

A VM release is the release protocol's exchange (docs/release-protocol.md) on ``/v1/vms/{id}/release``: a
challenge, a one-time HPKE key, evidence (the TPM quote) over :func:`~keysteward.attest.binding.host_binding`
of the nonce, the key and the hardware facts, and an answer whose VM key and disk secrets are each sealed to
the one-time key (``info = protocol 0 tenant 0 id 0 lease_id``). Transport and protocol errors are those of
:class:`~keysteward.agent.client.AgentClient`, which this wraps.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keysteward.agent.client import AgentClient, parse_plaintext, parse_time, protocol_error, release_info
from keysteward.agent.release_answers import Lease
from keysteward.attest.binding import canonical_hardware, host_binding
from keysteward.crypto.hpke import X25519, OneTimeKey
from keysteward.crypto.secret import SecretBuffer

PlatformEvidence = Callable[[bytes], dict[str, Any]]


@dataclass
class Disk:
    volume_id: str
    position: int
    path: str
    secret: SecretBuffer = field(repr=False)


@dataclass
class VmKeys:
    """What a VM release delivered: the VM key, each disk's keyslot secret, the lease. :meth:`wipe` them."""

    vm_id: str
    key: SecretBuffer = field(repr=False)
    disks: list[Disk]
    lease: Lease
    key_version: int
    snapshot_path: str | None = None
    launch: dict[str, Any] = field(default_factory=dict)

    def wipe(self, *, lease: bool = True) -> None:
        self.key.wipe()
        for disk in self.disks:
            disk.secret.wipe()
        if lease:
            self.lease.wipe()


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise protocol_error(f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise protocol_error(f"{what} is not base64") from None


class HostClient:
    def __init__(self, http: AgentClient, tenant: str) -> None:
        self.http = http
        self.tenant = tenant

    def orders(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """This host's pending orders (each handed out once); with ``wait``, the key manager holds the request
        until one comes, up to ``wait`` seconds (a long poll: an order reaches the host the moment it is made)."""
        return self.http.get_list("/host/orders", long_poll=wait)

    def report(self, order_id: str, ok: bool, result: Mapping[str, Any]) -> None:
        self.http.post(f"/host/orders/{order_id}", {"ok": ok, "result": dict(result)})

    def release(
        self, vm_id: str, hardware: dict[str, bool], platform: PlatformEvidence, *, snapshot: str | None = None,
        suite: str = X25519,
    ) -> VmKeys:  # fmt: skip
        extra = {"snapshot": snapshot} if snapshot is not None else {}
        return self._release(f"/vms/{vm_id}/release", vm_id, hardware, platform, extra, suite)[0]

    def migrate_release(
        self, vm_id: str, migration_id: str, hardware: dict[str, bool], platform: PlatformEvidence, csr_pem: bytes
    ) -> tuple[VmKeys, dict[str, Any]]:
        """``vm.migrate``: the VM's keys under an incoming lease, and this end's migration certificate."""
        path = f"/vms/{vm_id}/migrations/{migration_id}/release"
        return self._release(path, vm_id, hardware, platform, {"csr_pem": csr_pem.decode()}, X25519)

    def migration_progress(self, vm_id: str, migration_id: str, progress: Mapping[str, Any]) -> None:
        """The source's report of how far the state has gone (``vm migrate`` shows it)."""
        self.http.post(f"/vms/{vm_id}/migrations/{migration_id}/progress", dict(progress))

    def migration_ready(self, vm_id: str, migration_id: str, address: str) -> None:
        self.http.post(f"/vms/{vm_id}/migrations/{migration_id}/ready", {"address": address})

    def migration_state(self, vm_id: str, migration_id: str) -> str:
        """The migration's state as the key manager has it (``failed`` once it failed or was cancelled)."""
        return str(self.http.get(f"/vms/{vm_id}/migrations/{migration_id}").get("state", ""))

    def migration_source(self, vm_id: str, migration_id: str, lease: Lease, csr_pem: bytes) -> dict[str, Any]:
        """The source's migration certificate and where to send the VM (its live lease's token proves it)."""
        body = {"lease_id": lease.id, "token": lease.token_b64(), "csr_pem": csr_pem.decode()}
        return self.http.post(f"/vms/{vm_id}/migrations/{migration_id}/source", body)[1]

    def switchover(self, vm_id: str, migration_id: str, lease: Lease) -> dict[str, Any]:
        body = {"lease_id": lease.id, "token": lease.token_b64()}
        return self.http.post(f"/vms/{vm_id}/migrations/{migration_id}/switchover", body)[1]

    def _release(
        self, path: str, vm_id: str, hardware: dict[str, bool], platform: PlatformEvidence, extra: dict[str, Any],
        suite: str,
    ) -> tuple[VmKeys, dict[str, Any]]:  # fmt: skip
        challenge = self.http.challenge()
        one_time = OneTimeKey.generate(suite)
        bound = host_binding(challenge.nonce_bytes, one_time.public_bytes, canonical_hardware(hardware))
        body: dict[str, Any] = {
            "tenant": self.tenant, "nonce": challenge.nonce, "suite": suite, "hardware": hardware,
            "public_key": base64.b64encode(one_time.public_bytes).decode(),
            "evidence": {"identity": {}, **platform(bound)},
        }  # fmt: skip
        body.update(extra)
        _, answer = self.http.post(path, body)
        lease_body = answer.get("lease")
        if answer.get("status") != "released" or not isinstance(lease_body, dict) or answer.get("suite") != suite:
            raise protocol_error("a VM release answer without its lease or suite")
        lease_id = str(lease_body.get("id", ""))
        opened: list[SecretBuffer] = []
        try:
            key, token = parse_plaintext(one_time.open(_b64(answer.get("sealed"), "sealed"),
                                                       release_info(self.tenant, vm_id, lease_id)))  # fmt: skip
            opened += [key, token]
            disks = []
            for item in answer.get("disks") or []:
                volume_id = str(item.get("volume_id", ""))
                sealed = _b64(item.get("sealed"), "disk sealed")
                secret, spare = parse_plaintext(one_time.open(sealed, release_info(self.tenant, volume_id, lease_id)))
                spare.wipe()
                opened.append(secret)
                disks.append(Disk(volume_id, int(item.get("position", 0)), str(item.get("path", "")), secret))
            lease = Lease(
                id=lease_id, expires_at=parse_time(lease_body.get("expires_at"), "lease expires_at"),
                renew_seconds=float(lease_body.get("renew_seconds") or 0), token=token,
                lease_seconds=float(lease_body.get("lease_seconds") or 0),
                grace_seconds=None if lease_body.get("grace_seconds") is None else float(lease_body["grace_seconds"]),
            )  # fmt: skip
            snapshot_path = answer.get("snapshot_path")
            launch = answer.get("launch")
            keys = VmKeys(
                vm_id, key, disks, lease, int(answer.get("key_version") or 0),
                str(snapshot_path) if snapshot_path is not None else None, launch if isinstance(launch, dict) else {},
            )  # fmt: skip
            return keys, answer
        except BaseException:
            for buffer in opened:
                buffer.wipe()
            raise

    def snapshot_permit(self, vm_id: str, lease: Lease, path: str) -> str:
        """``vm.snapshot``: leave to save the VM's state at ``path``; returns the snapshot id."""
        _, answer = self.http.post(f"/vms/{vm_id}/snapshots",
                                   {"lease_id": lease.id, "token": lease.token_b64(), "path": path})  # fmt: skip
        snapshot = answer.get("snapshot")
        if not isinstance(snapshot, str):
            raise protocol_error("a snapshot permit without its id")
        return snapshot
