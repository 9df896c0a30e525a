"""Where the proxy's volume keys come from, and when they must go.

Two key sources per export (:class:`~keysteward.proxy.config.ExportConfig`):

- ``kms = true``: a release as a ``host``. The proxy proves itself with its mTLS client certificate (no
  identity document: :class:`~keysteward.agent.unlock.UnlockOptions` with ``identity="host"``), the volume's
  ``keysteward`` token names key manager, tenant and volume, and the volume opens in this process (userspace
  mode, its key in a locked buffer). The lease is then kept by :class:`ExportKeeper`, which runs the instance
  agent's state machine (:class:`keysteward.agent.daemon.Agent`, held, not subclassed): the same renewal
  schedule, grace when the key manager is unreachable, and the same answers to ``revoked``, ``shred``,
  ``expired`` and a lost lease. What the proxy adds goes through the agent's two hooks: when a volume opens it
  becomes an export (``on_open``), and before its key is wiped the NBD server drops the export and its
  connections (``on_close``, which blocks until that is done), so no request ever meets a wiped cipher.
- ``passphrase_file``: break-glass (and tests): :func:`open_passphrase_export` opens the volume with the
  file's bytes, wiped right after.

The keeper's methods block (HTTP to the key manager, KDFs): the service calls them in worker threads, one at a
time (:attr:`ExportKeeper.mutex`), never on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from keysteward.agent.config import VolumeEntry
from keysteward.agent.daemon import Agent, Tracked
from keysteward.agent.unlock import UnlockOptions
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import KeystewardError
from keysteward.proxy.config import ExportConfig, KmsConfig
from keysteward.proxy.export import LuksExport
from keysteward.volume.keyfile import read_key_file

OpenHook = Callable[[str, LuksExport], None]
"""``on_open(name, export)``: a released volume is ready to serve (called in the keeper's thread)."""
CloseHook = Callable[[str, str], None]
"""``on_close(name, reason)``: drop the export and its connections now; returns when done (keeper's thread)."""


def open_passphrase_export(entry: ExportConfig) -> LuksExport:
    """Open ``entry``'s volume with the bytes of its passphrase file (wiped before this returns)."""
    if entry.passphrase_file is None:
        raise KeystewardError(f"export {entry.name!r} has no passphrase_file", code="proxy_config")
    passphrase = read_key_file(entry.passphrase_file)
    try:
        return LuksExport.open(
            entry.name, entry.path, passphrase, read_only=entry.read_only, description=entry.description
        )
    finally:
        wipe_bytearray(passphrase)


def host_options(kms: KmsConfig, entry: ExportConfig) -> UnlockOptions:
    """How the proxy releases ``entry``'s key: as a host, by mTLS, the volume kept open in this process."""
    return UnlockOptions(
        name=entry.name, kms_url=kms.url, identity="host", client_cert=(kms.cert_file, kms.key_file),
        ca_file=kms.ca_file, timeout=kms.timeout, mode="userspace", writable=not entry.read_only,
    )  # fmt: skip


def volume_entry(kms: KmsConfig, entry: ExportConfig) -> VolumeEntry:
    return VolumeEntry(entry.name, entry.path, host_options(kms, entry), kms.grace_seconds)


class ExportKeeper:
    """The agent's lease state machine over the proxy's ``kms`` exports (see the module doc): an
    :class:`~keysteward.agent.daemon.Agent` with two hooks, not a subclass.

    The agent's own loop (:meth:`Agent.run`, with its signal handlers) is not used: the service calls
    :meth:`tick` from a worker thread and sleeps on the event loop for the time it returns.
    """

    def __init__(
        self,
        kms: KmsConfig | None,
        entries: list[ExportConfig],
        *,
        on_open: OpenHook,
        on_close: CloseHook,
        config: str = "",
    ) -> None:
        self.kms = kms
        self.configs: dict[str, ExportConfig] = {}
        self.on_open = on_open
        self.on_close = on_close
        self.exports: dict[str, LuksExport] = {}
        self.mutex = threading.Lock()
        # no status file of its own: the service writes the proxy's status (exports and leases together)
        self.agent = Agent([], "", config=config, on_unlock=self._opened, before_lock=self._closing)
        for entry in entries:
            self._track(entry)

    # -- what the service calls (worker threads) ----------------------------------------------------

    def tick(self) -> float:
        """Everything due now (releases, renewals, locks at deadlines); the seconds until more is due."""
        with self.mutex:
            self.agent.step()
            return self.agent.next_due()

    def add(self, entry: ExportConfig) -> None:
        """Track one more ``kms`` export; it opens at the next :meth:`tick`."""
        with self.mutex:
            if any(v.name == entry.name for v in self.agent.volumes):
                raise KeystewardError(f"export {entry.name!r} is already kept", code="proxy_config")
            self._track(entry)

    def remove(self, name: str, reason: str = "removed") -> None:
        """Stop serving ``name``: drop the export, wipe its key, end its lease cleanly."""
        with self.mutex:
            self.agent.forget(name, reason)
            self.configs.pop(name, None)

    def close_all(self) -> None:
        """Shutdown: end every lease and wipe every key (the exports were flushed and closed by the server)."""
        with self.mutex:
            self.agent.shutdown()

    def states(self) -> dict[str, dict[str, Any]]:
        """Per export what the agent knows (state, reason, lease expiry, last action); never key bytes.

        Without the mutex: the hooks call this (through the status) while a tick holds it; a status read in
        the middle of a tick is at worst one step old."""
        return {v.name: v.status() for v in list(self.agent.volumes)}

    def released_url(self) -> str | None:
        """The key manager some export's key was released by (the volume's token names it)."""
        return next((v.unlocked.url for v in list(self.agent.volumes) if v.unlocked is not None), None)

    # -- the agent's hooks ------------------------------------------------------------------------------

    def _track(self, entry: ExportConfig) -> None:
        if self.kms is None:
            raise KeystewardError(f"export {entry.name!r} has kms = true but there is no [kms]", code="proxy_config")
        self.configs[entry.name] = entry
        self.agent.track(volume_entry(self.kms, entry))

    def _opened(self, v: Tracked) -> None:
        """The released volume becomes an export (raising makes the agent end the lease and lock it again)."""
        unlocked = v.unlocked
        assert unlocked is not None
        entry = self.configs[v.name]
        if unlocked.volume is None:
            raise KeystewardError("the released volume did not open in userspace", code="proxy_open_failed")
        export = LuksExport(entry.name, unlocked.volume, read_only=entry.read_only, description=entry.description)
        self.exports[v.name] = export
        self.on_open(v.name, export)

    def _closing(self, v: Tracked, reason: str) -> None:
        """Before the key is wiped: the server drops the export and its connections, then the export closes."""
        export = self.exports.pop(v.name, None)
        if export is None:
            return
        try:
            self.on_close(v.name, reason)
        finally:
            export.close()  # waits for requests in flight, flushes, wipes the key (harmless if done already)
