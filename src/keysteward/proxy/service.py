"""``keysteward proxy serve``: the proxy's runtime, one asyncio event loop.

Start-up: load the config (:mod:`keysteward.proxy.config`), harden the process (no core dumps, not
ptrace-able), open the ``passphrase_file`` exports, release the ``kms`` exports as a host
(:class:`~keysteward.proxy.keys.ExportKeeper`), then listen (:class:`~keysteward.proxy.server.NbdServer`)
and serve the metrics. From then on:

- the keeper runs in a worker thread, one :meth:`~keysteward.proxy.keys.ExportKeeper.tick` at a time: lease
  renewals; a revocation, shred or lost lease drops that export (its connections are closed, the key wiped)
  and leaves the others alone;
- with ``[tls]`` and ``[kms]``, the key manager's revoked certificates and retired CAs are fetched every second
  (:mod:`keysteward.proxy.revocations`) and applied to the NBD server: their connections are aborted;
- ``SIGHUP`` reloads the export list: exports that left the file (or whose settings changed) are dropped,
  new ones opened, the others keep serving without a dropped connection. A config that does not load is
  logged and the running one kept. The listen address, TLS and metrics settings need a restart (said in
  the log);
- ``SIGTERM``/``SIGINT``: the server stops (every export flushed and closed), the leases end cleanly, exit 0.

Logs are JSON lines (:class:`JsonFormatter`); the agent's ``event=... key=value`` lines become fields.
After every change of the export list one ``status`` line says what is served, and ``status_file`` (if
configured) holds the same as JSON. Never key bytes or passphrases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keysteward.agent.process import harden_process, logline, sd_notify, write_status
from keysteward.errors import KeystewardError
from keysteward.logs import JsonFormatter, json_logging
from keysteward.proxy.config import ExportConfig, ProxyConfig, ProxyConfigError, load_config
from keysteward.proxy.export import Export, LuksExport
from keysteward.proxy.keys import ExportKeeper, open_passphrase_export
from keysteward.proxy.metrics import ProxyMetrics
from keysteward.proxy.revocations import RevocationFetcher, Revocations, add_client_cas, follow

if TYPE_CHECKING:
    from keysteward.proxy.server import NbdServer

log = logging.getLogger("keysteward.proxy")
DROP_TIMEOUT = 30.0
"""Seconds the keeper waits for the server to drop a revoked export before it wipes the key regardless."""


# -- logs --------------------------------------------------------------------------------------------


def setup_logging(level: str) -> None:
    """JSON lines on standard error at ``level`` for the whole process."""
    json_logging(level)


def event(name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    log.log(level, name, extra={"fields": {"event": name, **fields}})


# -- TLS ---------------------------------------------------------------------------------------------


def tls_context(config: ProxyConfig) -> ssl.SSLContext | None:
    """The NBD server's TLS context: TLS 1.2+, the proxy's certificate; clients must present a certificate
    that ``client_ca_file`` issued (``CERT_REQUIRED``)."""
    if config.tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
        ctx.load_verify_locations(cafile=config.tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ProxyConfigError(f"{config.source}: tls: cannot load the certificate, key or CA: {exc}") from None
    return ctx


# -- the runtime -------------------------------------------------------------------------------------


class ProxyService:
    """The proxy: exports, keeper, NBD server and metrics on one event loop (see the module doc)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = ProxyMetrics()
        self.exports: dict[str, Export] = {}
        """What is served now (open exports only)."""
        self.failed: dict[str, str] = {}
        """Configured passphrase exports that did not open: name -> error code."""
        self.server: NbdServer | None = None
        self.keeper: ExportKeeper | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.revocations: RevocationFetcher | None = None

    # -- hooks the keeper calls from its worker thread ------------------------------------------------

    def _on_open(self, name: str, export: LuksExport) -> None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._add_export(name, export), self._loop)
        future.result(timeout=DROP_TIMEOUT)

    def _on_close(self, name: str, reason: str) -> None:
        assert self._loop is not None
        drop = self._drop_export(name, reason, graceful=reason in ("removed", "stopped"))
        future = asyncio.run_coroutine_threadsafe(drop, self._loop)
        future.result(timeout=DROP_TIMEOUT)

    # -- exports ----------------------------------------------------------------------------------------

    async def _add_export(self, name: str, export: Export) -> None:
        self.exports[name] = export
        self.failed.pop(name, None)
        self.metrics.opened(name)
        if self.server is not None:
            self.server.set_exports(dict(self.exports))
        event("export_opened", export=name, size=export.size, read_only=export.read_only)
        self._status()

    async def _drop_export(self, name: str, reason: str, *, graceful: bool = False) -> None:
        """Stop serving ``name``, flush it and wipe its key. Revocation (the default) aborts its connections
        at once; ``graceful`` (a reload removed it) lets their requests in flight finish first."""
        export = self.exports.pop(name, None)
        if export is None:
            return
        if self.server is not None:
            if graceful:
                self.server.set_exports(dict(self.exports))
            else:
                await self.server.close_export(name, reason)
        await asyncio.to_thread(export.close)  # waits for requests in flight; harmless if the server closed it
        self.metrics.closed(name, reason)
        event("export_closed", logging.WARNING, export=name, reason=reason)
        self._status()

    async def _open_passphrase(self, entry: ExportConfig) -> bool:
        try:
            export = await asyncio.to_thread(open_passphrase_export, entry)
        except KeystewardError as exc:
            self.failed[entry.name] = exc.code
            event("export_failed", logging.ERROR, export=entry.name, code=exc.code, error=exc.message)
            return False
        await self._add_export(entry.name, export)
        return True

    # -- running ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the exports, then listen; a passphrase export that does not open fails the start."""
        self._loop = asyncio.get_running_loop()
        for entry in self.config.exports:
            if not entry.kms and not await self._open_passphrase(entry):
                await self._close_all()
                raise KeystewardError(f"export {entry.name!r} did not open ({self.failed[entry.name]})",
                                      code="proxy_open_failed")  # fmt: skip
        kms_entries = [entry for entry in self.config.exports if entry.kms]
        self.keeper = ExportKeeper(self.config.kms, kms_entries, on_open=self._on_open, on_close=self._on_close,
                                   config=self.config.source)  # fmt: skip
        await asyncio.to_thread(self.keeper.tick)  # first releases before the first client
        from keysteward.proxy.server import NbdServer  # the server's modules load when it starts

        server = NbdServer(
            dict(self.exports), tls=tls_context(self.config), allow_plaintext=self.config.allow_plaintext,
            clients=self._clients,
        )  # fmt: skip
        server.on_request = self.metrics.observe
        server.on_requests = self.metrics.observe_many
        server.on_refused = self.metrics.refused
        self.port = await server.start(self.config.listen_address, self.config.listen_port)
        self.server = server
        server.set_exports(dict(self.exports))  # those that opened while it started
        if self.config.metrics_address is not None and self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_address, self.config.metrics_port)
        self._spawn(self._keep_leases())
        if self.config.tls is not None and self.config.kms is not None:
            self.revocations = RevocationFetcher(self.config.kms, self._kms_url)
            self._spawn(follow(self.revocations, self._apply_revocations, self._stop))
        elif self.config.tls is not None:
            event("revocations_unchecked", logging.WARNING,
                  why="no [kms]: the proxy cannot learn the key manager's certificate revocations")  # fmt: skip
        event("listening", address=self.config.listen_address, port=self.port, tls=self.config.tls is not None,
              metrics_port=self.metrics_port)  # fmt: skip
        self._status()
        sd_notify("READY=1")

    def _clients(self, name: str) -> tuple[str, ...]:
        """Who may open export ``name`` under the config in force (a reload that changes it reopens the export)."""
        try:
            return self.config.export(name).clients
        except KeyError:
            return ()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_leases(self) -> None:
        assert self.keeper is not None
        while not self._stop.is_set():
            try:
                delay = await asyncio.to_thread(self.keeper.tick)
            except Exception as exc:  # noqa: BLE001 - the keeper must go on; the error is logged
                event("keeper_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}"[:300])
                delay = 1.0
            self._status_file()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def _kms_url(self) -> str | None:
        """The key manager of a released volume (when ``[kms] url`` is not set)."""
        return self.keeper.released_url() if self.keeper is not None else None

    def _apply_revocations(self, found: Revocations) -> None:
        if self.server is not None:
            self.server.set_revocations(found)

    async def run(self) -> None:
        """Start, then serve until SIGTERM/SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):  # a stop during start-up is a clean stop too
            loop.add_signal_handler(signum, self._stop.set)
        try:
            await self.start()
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
            await self._stop.wait()
        finally:
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        """Clean stop: the server flushes and closes every export, then the leases end and keys are wiped."""
        sd_notify("STOPPING=1")
        self._stop.set()
        self._wake.set()
        async with self._reloading:
            await self._close_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.metrics.close()
        event("stopped")

    async def _close_all(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop()
        exports, self.exports = dict(self.exports), {}
        for export in exports.values():
            await asyncio.to_thread(export.close)
        if self.keeper is not None:
            await asyncio.to_thread(self.keeper.close_all)
        self._status_file()

    # -- reload -----------------------------------------------------------------------------------------

    async def reload(self) -> None:
        """Apply the config file's export list again (see the module doc)."""
        async with self._reloading:
            if self._stop.is_set():
                return
            sd_notify("RELOADING=1")
            try:
                new = await asyncio.to_thread(load_config, self.config.source)
            except KeystewardError as exc:
                event("reload_failed", logging.ERROR, code=exc.code, error=exc.message)
                sd_notify("READY=1")
                return
            await self._apply(new)
            sd_notify("READY=1")

    async def _apply(self, new: ProxyConfig) -> None:
        old = self.config
        for what in ("listen_address", "listen_port", "allow_plaintext", "tls", "metrics_address", "metrics_port"):
            if getattr(old, what) != getattr(new, what):
                event("restart_needed", logging.WARNING, setting=what)
        kms_changed = old.kms != new.kms
        before = {e.name: e for e in old.exports}
        after = {e.name: e for e in new.exports}
        gone = [name for name, e in before.items() if after.get(name) != e or (e.kms and kms_changed)]
        assert self.keeper is not None
        for name in gone:
            if before[name].kms:
                await asyncio.to_thread(self.keeper.remove, name, "removed")
            else:
                await self._drop_export(name, "removed", graceful=True)
            self.failed.pop(name, None)
            self.metrics.forget(name)
        self.config = new
        self.keeper.kms = new.kms
        if self.revocations is not None and new.kms is not None:
            self.revocations.kms = new.kms
            self.revocations.close()
        if self.server is not None and self.server.tls is not None and new.tls is not None:
            add_client_cas(self.server.tls, new.tls.client_ca_file)
        added = [e for name, e in after.items() if name not in before or name in gone]
        for entry in added:
            if entry.kms:
                await asyncio.to_thread(self.keeper.add, entry)
            else:
                await self._open_passphrase(entry)
        self._wake.set()  # the keeper releases the new kms exports now
        event("reloaded", removed=gone, added=[e.name for e in added], exports=sorted(after))
        self._status()

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per configured export: served or not, why, and for kms exports the lease (never key bytes)."""
        leases = self.keeper.states() if self.keeper is not None else {}
        exports: dict[str, Any] = {}
        for entry in self.config.exports:
            served = entry.name in self.exports
            info: dict[str, Any] = {"path": entry.path, "source": "kms" if entry.kms else "passphrase_file",
                                    "state": "open" if served else "locked", "read_only": entry.read_only}  # fmt: skip
            if entry.name in leases:
                lease = leases[entry.name]
                info |= {"reason": lease["reason"], "lease_expires_at": lease["lease_expires_at"],
                         "last_action": lease["last_action"], "last_error": lease["last_error"]}  # fmt: skip
                if lease["state"] == "shredded":
                    info["state"] = "shredded"
            elif entry.name in self.failed:
                info["reason"] = self.failed[entry.name]
            exports[entry.name] = info
        return {
            "proxy": {"pid": os.getpid(), "started_at": self.started_at, "config": self.config.source,
                      "address": self.config.listen_address, "port": self.port, "metrics_port": self.metrics_port,
                      "updated_at": datetime.now(UTC).isoformat(timespec="seconds")},
            "exports": exports,
        }  # fmt: skip

    def _status(self) -> None:
        """The status line (and file): ``served=a,b locked=c``."""
        status = self.status()
        by_state: dict[str, list[str]] = {}
        for name, info in status["exports"].items():
            by_state.setdefault(info["state"], []).append(name)
        event("status", port=self.port, **{state: ",".join(names) for state, names in sorted(by_state.items())})
        self._status_file(status)

    def _status_file(self, status: Mapping[str, Any] | None = None) -> None:
        if not self.config.status_file:
            return
        try:
            write_status(self.config.status_file, dict(status or self.status()))
        except OSError as exc:
            event("status_write_failed", logging.ERROR, file=self.config.status_file, error=exc.strerror)


def serve(config_path: str, *, log_level: str | None = None) -> int:
    """``keysteward proxy serve``: run until SIGTERM/SIGINT; 0 after a clean stop."""
    config = load_config(config_path)
    setup_logging(log_level or config.log_level)
    harden_process()
    service = ProxyService(config)
    started = time.monotonic()
    asyncio.run(service.run())
    event("exit", uptime_seconds=round(time.monotonic() - started, 1))
    return 0


__all__ = ["JsonFormatter", "ProxyService", "logline", "serve", "setup_logging", "tls_context"]
