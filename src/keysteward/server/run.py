"""Start-up: ``server init`` (create a key manager in a data directory) and ``server start``."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import uvicorn

from keysteward.audit.log import AuditLog
from keysteward.crypto import x509ca
from keysteward.crypto.secret import disable_core_dumps, wipe_bytearray
from keysteward.errors import BadRequest, Conflict
from keysteward.identity.principal import SYSTEM_TENANT
from keysteward.identity.tenants import NewToken, Tenants
from keysteward.keys import root as root_module
from keysteward.kmip.listener import KmipLimits, KmipListener, KmipServer
from keysteward.kmip.operations import Operations
from keysteward.kmip.trust import ClientTrust, trust_pins
from keysteward.logs import json_logging
from keysteward.netlimits import Limits, uvicorn_protocol
from keysteward.server import datadir, tls_sessions, tls_tickets
from keysteward.server.accept_balance import BOARD_FD, WORKER_INDEX, BalancedServer, Board
from keysteward.server.app import create_app
from keysteward.server.services import Services
from keysteward.server.supervisor import KMIP_FD, SEAL_SIGNAL, WORKER_FD, bind, supervise
from keysteward.server.tls import ClientCertHttpToolsProtocol, add_client_ca, server_ssl_context
from keysteward.settings import CONFIG_NAME, Settings, listen_address, load, render
from keysteward.store.db import Database
from keysteward.xks.app import XksApp
from keysteward.xks.listener import XksListener

log = logging.getLogger("keysteward.server")
CA_REFRESH_SECONDS = 1.0
SWITCH_INTERVAL = 0.0005
GC_THRESHOLDS = (20_000, 50, 100)
_ANY_V4 = "0.0.0.0"  # noqa: S104 - only to leave the wildcard out of certificate names


@dataclass(repr=False)
class InitOutput:
    settings: Settings
    result: root_module.InitResult
    root_token: NewToken
    ca_file: Path

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.server.tls else "http"
        return f"{scheme}://{self.settings.server.listen_host}:{self.settings.server.listen_port}"


def _write_private(path: Path, data: bytes | bytearray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_tls(settings: Settings) -> tuple[Settings, Path]:
    tls_dir = settings.tls_dir
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_pem, ca_key = x509ca.new_ca("keysteward server CA")
    try:
        hosts = sorted({"localhost", socket.gethostname(), settings.server.listen_host} - {_ANY_V4, "::"})
        ips = sorted(
            {"127.0.0.1", "::1"}
            | ({settings.server.listen_host} if _is_ip(settings.server.listen_host) else set()) - {_ANY_V4, "::"}
        )
        hostnames = [h for h in hosts if not _is_ip(h)]
        issued = x509ca.issue_server_cert(ca_pem, ca_key, hostnames=hostnames, ips=ips)
    finally:
        wipe_bytearray(ca_key)  # the server CA signs once; its key is not kept
    (tls_dir / "ca.pem").write_text(ca_pem)
    (tls_dir / "server.pem").write_text(issued.cert_pem + ca_pem)
    assert issued.key_pem is not None
    _write_private(tls_dir / "server.key", issued.key_pem)
    wipe_bytearray(issued.key_pem)
    server = dataclasses.replace(
        settings.server,
        tls_cert=str(tls_dir / "server.pem"),
        tls_key=str(tls_dir / "server.key"),
        tls_ca=str(tls_dir / "ca.pem"),
    )
    return dataclasses.replace(settings, server=server), tls_dir / "ca.pem"


def _is_ip(value: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
    except OSError:
        return False
    return True


def initialize(settings: Settings, seal_type: str, *, threshold: int, shares: int, allow_dev_seal: bool) -> InitOutput:
    if seal_type == "dev" and not allow_dev_seal:
        raise BadRequest(
            "the dev seal keeps the unseal key in a local file; pass --insecure-dev-seal to accept that (demos only)",
            code="dev_seal_refused",
        )
    if (settings.data_dir / CONFIG_NAME).exists():
        raise Conflict(f"{settings.data_dir} holds a keysteward configuration already", code="already_initialized")
    if not settings.server.tls and settings.server.listen_host not in {"127.0.0.1", "::1", "localhost"}:
        raise BadRequest("plain HTTP is only allowed on loopback", code="tls_required")
    datadir.prepare(settings.data_dir)  # 0700 before anything is written into it, whatever it was
    ca_file = Path(settings.server.tls_ca) if settings.server.tls_ca else Path()
    if settings.server.tls and not settings.server.tls_cert:
        settings, ca_file = make_tls(settings)
    seal = settings.seal
    if seal_type == "dev" and not seal.dev_key_file:
        seal = dataclasses.replace(seal, dev_key_file=str(settings.data_dir / "dev-unseal.key"))
        settings = dataclasses.replace(settings, seal=seal)
    db = Database(
        settings.database_url,
        sqlite_synchronous=settings.storage.sqlite_synchronous,
        timeout=settings.storage.database_timeout_seconds,
    )
    try:
        db.migrate()
        result = root_module.initialize(
            db,
            seal_type,
            seal,
            dev_key_file=Path(seal.dev_key_file) if seal.dev_key_file else None,
            threshold=threshold,
            share_count=shares,
        )
        audit = AuditLog(db)
        tenants = Tenants(db, audit)
        token = tenants.bootstrap_system()
        system_id = tenants.get(SYSTEM_TENANT).id
        audit.record(
            system_id,
            actor="init",
            action="seal.init",
            target="cluster",
            details={
                "seal_type": seal_type,
                "cluster_id": result.cluster_id,
                "threshold": result.threshold,
                "shares": len(result.shares),
            },
        )
    finally:
        db.dispose()
    (settings.data_dir / CONFIG_NAME).write_text(render(settings))
    datadir.lock_down(settings.data_dir, datadir.sqlite_files(settings.database_url))
    return InitOutput(settings, result, token, ca_file)


def build_services(settings: Settings) -> Services:
    svc = Services.build(settings)
    if svc.root.seal_type != "shamir":
        svc.root.auto_unseal()
        system_id = svc.tenants.get(SYSTEM_TENANT).id
        svc.audit.record(
            system_id,
            actor="server",
            action="seal.auto_unseal",
            target="cluster",
            details={"seal_type": svc.root.seal_type},
        )
    return svc


def _refresh_cas(svc: Services, ctx: ssl.SSLContext, stop: threading.Event) -> None:
    """Other servers on the same database may add tenant CAs: trust them here too."""
    known: set[str] = set()
    while not stop.wait(CA_REFRESH_SECONDS):
        try:
            for pem in svc.cas.trusted_pems():
                if pem not in known:
                    add_client_ca(ctx, pem)
                    known.add(pem)
        except Exception:  # noqa: BLE001 - keep refreshing; the next round may succeed
            log.warning("could not refresh tenant CAs from the database")


def listener_limits(settings: Settings) -> Limits:
    """The REST listener's connection, head and timing limits (``[server]`` settings)."""
    s = settings.server
    return Limits(
        max_connections=s.max_connections,
        max_connections_per_source=s.max_connections_per_source,
        max_header_bytes=s.max_header_bytes,
        max_headers=s.max_headers,
        header_timeout=s.header_timeout,
        body_timeout=s.body_timeout,
    )


def xks_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The XKS listener's TLS: the REST listener's settings and certificate (or ``[xks] tls_cert``), client
    certificates required only with ``[xks] mtls_ca`` (AWS KMS presents one when asked)."""
    cert = settings.xks.tls_cert or settings.server.tls_cert
    key = settings.xks.tls_key or settings.server.tls_key
    if not cert or not key:
        raise BadRequest(
            "the XKS listener needs TLS: set [server] tls or [xks] tls_cert and tls_key", code="tls_required"
        )
    ctx = server_ssl_context(cert, key, [])
    if settings.xks.mtls_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=settings.xks.mtls_ca)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def start_xks(settings: Settings, svc: Services, tickets: bytes | None = None) -> XksListener | None:
    """The XKS listener, when ``[xks] listen`` is set: in every worker, on a socket of its own (SO_REUSEPORT),
    each worker holding its share of the per-store quota."""
    if not settings.xks.listen:
        return None
    share = max(1, settings.server.workers)
    xks_settings = dataclasses.replace(settings.xks, quota_tps=settings.xks.quota_tps / share)
    app = XksApp(svc.xks, svc.access, svc.xks_crypto.probe, xks_settings, svc.xks_metrics, svc.refusals)
    try:
        sock = bind(*listen_address(settings.xks.listen, "xks.listen"))
    except OSError as exc:
        raise BadRequest(f"cannot listen on {settings.xks.listen}: {exc.strerror}", code="xks_listen_failed") from None
    ctx = xks_ssl_context(settings)
    tls_tickets.share(ctx, tickets, "xks")
    listener = XksListener(app, sock, ctx, listener_limits(settings), ClientCertHttpToolsProtocol)
    listener.start()
    return listener


def serve(
    settings: Settings,
    listen_fd: int | None = None,
    tickets: bytes | None = None,
    kmip_fd: int | None = None,
    board: Board | None = None,
) -> None:
    """Serve in this process; with ``server.workers`` > 1, supervise that many worker processes. ``tickets``:
    a worker's share of its supervisor's TLS ticket secret (:mod:`keysteward.server.tls_tickets`); ``kmip_fd``:
    the KMIP listening socket the supervisor bound for all its workers; ``board``: where the workers count the
    REST connections each holds, so that the one holding the fewest accepts the next (with ``listen_fd``
    then a socket shared by all the workers: :mod:`keysteward.server.accept_balance`)."""
    json_logging(settings.server.log_level)
    if settings.server.workers > 1 and listen_fd is None:
        raise SystemExit(supervise(settings))
    limits = listener_limits(settings)  # bad limits fail the start before anything opens
    disable_core_dumps()
    # request threads, the audit writer and the event loop hand the GIL around constantly; the default
    # 5 ms switch interval would add whole milliseconds of queueing to each hand-off
    sys.setswitchinterval(SWITCH_INTERVAL)
    svc = build_services(settings)
    app = create_app(svc)
    # what start-up allocated lives as long as the process: keep it out of every later collection, and
    # collect the young generation less often, so no request waits behind a long full collection
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    stop = threading.Event()
    kmip: KmipListener | None = None
    if listen_fd is not None:
        _join_worker_seal(svc)
    svc.rewrapper.start()
    svc.checkpoints.start()
    xks: XksListener | None = None
    try:
        xks = start_xks(settings, svc, tickets)
        server_kw: dict[str, Any] = {
            "log_level": settings.server.log_level,
            "access_log": False,
            "log_config": None,  # uvicorn's own lines go through the process's JSON handler
            "timeout_keep_alive": 30,
            "proxy_headers": False,  # the source is the TCP peer: X-Forwarded-For would let a local caller pick it
        }
        host, port = settings.server.listen_host, settings.server.listen_port
        ctx: ssl.SSLContext | None = None
        if settings.server.tls:
            ctx = server_ssl_context(settings.server.tls_cert, settings.server.tls_key, svc.cas.trusted_pems())
            tls_tickets.share(ctx, tickets, "rest")
            tls_ctx = ctx
            svc.cas.on_new_ca.append(lambda pem: add_client_ca(tls_ctx, pem))
            threading.Thread(target=_refresh_cas, args=(svc, ctx, stop), daemon=True).start()
        kmip = start_kmip(svc, stop, tickets, None if kmip_fd is None else socket.socket(fileno=kmip_fd))
        # the TLS handshake runs in the limits layer (counted, timed), not in uvicorn: see keysteward.netlimits
        protocol = uvicorn_protocol(ClientCertHttpToolsProtocol, limits, tls=ctx)
        config = uvicorn.Config(app, host=host, port=port, http=cast(Any, protocol), **server_kw)
        if listen_fd is not None and board is not None:
            server: uvicorn.Server = BalancedServer(config, socket.socket(fileno=listen_fd), board)
            listen_fd = None
        else:
            server = uvicorn.Server(config)
        # uvicorn stops on SIGTERM and then raises it again for the handler it found: with the default one the
        # process would die there, before the close below writes the counted refusals and the last checkpoints
        signal.signal(signal.SIGTERM, _stopped)
        server.run(sockets=[socket.socket(fileno=listen_fd)] if listen_fd is not None else None)
    finally:
        stop.set()
        if xks is not None:
            xks.stop()
        if kmip is not None:
            kmip.stop()
        svc.close()


def _stopped(_signum: int, _frame: object) -> None:
    """SIGTERM once the server has stopped: nothing more to do than let ``serve`` close its services."""


def start_kmip(
    svc: Services, stop: threading.Event, tickets: bytes | None = None, sock: socket.socket | None = None
) -> KmipListener | None:
    """The KMIP listener when ``[kmip] listen`` is set: mutual TLS required, tenant CAs as trust anchors.
    ``sock``: a worker's listening socket, shared with the other workers (else the listener binds its own)."""
    k = svc.settings.kmip
    if not k.listen:
        return None
    if not svc.settings.server.tls:
        raise BadRequest("the KMIP listener needs TLS: server.tls must be true", code="bad_setting")
    host, port = listen_address(k.listen, "kmip.listen")
    limits = Limits(
        max_connections=k.max_connections,
        max_connections_per_source=k.max_connections_per_source,
        header_timeout=k.read_timeout,
        body_timeout=k.read_timeout,
    )
    ctx = server_ssl_context(svc.settings.server.tls_cert, svc.settings.server.tls_key, svc.cas.trusted_pems())
    ctx.verify_mode = ssl.CERT_REQUIRED
    if k.tls_ciphers:
        ctx.set_ciphers(k.tls_ciphers)
    # vCenter resumes a session on each new connection: held sessions cost no certificate decode, tickets do
    if not tls_sessions.hold_sessions(ctx, tls_sessions.store_from_supervisor(tickets, "kmip")):
        tls_tickets.share(ctx, tickets, "kmip")
    svc.cas.on_new_ca.append(lambda pem: add_client_ca(ctx, pem))
    threading.Thread(target=_refresh_cas, args=(svc, ctx, stop), daemon=True).start()
    trust_pins(ctx, svc.kmip_pins, stop)  # trust mode C: pinned self-signed certificates (kmip/trust.py)
    trust = ClientTrust(svc.cas, svc.kmip_pins, svc.refusals, svc.tenants.id_or_unknown)
    operations = Operations(svc.kmip, k.max_locate_items)
    bounds = KmipLimits(k.max_message_bytes, k.idle_timeout, k.read_timeout)
    server = KmipServer(operations, trust.authenticate, trust.seen, bounds)
    listener = KmipListener(server, host, port, ctx, limits, sock)
    listener.start()
    svc.kmip_metrics = server.metrics.registry
    return listener


def _join_worker_seal(svc: Services) -> None:
    """A worker seals when any worker seals: it tells the supervisor, which tells every worker."""
    from_supervisor = threading.local()

    def on_signal(_signum: int, _frame: object) -> None:
        if not svc.root.sealed:
            from_supervisor.active = True
            try:
                svc.root.seal()
            finally:
                from_supervisor.active = False

    def on_seal() -> None:
        if not getattr(from_supervisor, "active", False):
            os.kill(os.getppid(), SEAL_SIGNAL)

    signal.signal(SEAL_SIGNAL, on_signal)
    svc.root.on_seal(on_seal)


def worker_main() -> None:
    """Entry point of a worker process started by :func:`keysteward.server.supervisor.supervise`."""
    tickets = tls_tickets.secret_from_supervisor()
    kmip_fd = os.environ.get(KMIP_FD)
    serve(
        load(Path(os.environ["KEYSTEWARD_DATA_DIR"])),
        listen_fd=int(os.environ[WORKER_FD]),
        tickets=tickets,
        kmip_fd=None if kmip_fd is None else int(kmip_fd),
        board=Board(int(os.environ[BOARD_FD]), int(os.environ[WORKER_INDEX])),
    )
