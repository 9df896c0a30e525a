"""Several server processes on one port, for machines with more than one core.

The supervisor binds the sockets, migrates the database once, and starts ``workers`` processes
that each unseal on their own (so only the auto-unsealing seals, pkcs11 and dev, may run more
than one) and accept from the same sockets (the REST one balanced by connections held:
:mod:`keysteward.server.accept_balance`). A seal on any worker reaches every worker: the worker
signals the supervisor (SIGUSR1), which passes the signal on to all of them. If a worker dies,
the supervisor stops the rest and exits non-zero, for systemd to restart the whole server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from keysteward.errors import BadRequest
from keysteward.server import tls_sessions, tls_tickets
from keysteward.server.accept_balance import BOARD_FD, WORKER_INDEX, new_board
from keysteward.settings import Settings, listen_address
from keysteward.store.db import Database
from keysteward.store.models import Cluster

log = logging.getLogger("keysteward.server")
WORKER_FD = "KEYSTEWARD_WORKER_FD"
KMIP_FD = "KEYSTEWARD_KMIP_LISTEN_FD"
"""The KMIP listening socket every worker accepts from (see :func:`bind`)."""
SEAL_SIGNAL = signal.SIGUSR1


def _seal_type(settings: Settings) -> str:
    db = Database(
        settings.database_url,
        sqlite_synchronous=settings.storage.sqlite_synchronous,
        timeout=settings.storage.database_timeout_seconds,
    )
    try:
        db.migrate()
        with db.read() as conn:
            from sqlalchemy import select

            return str(conn.execute(select(Cluster.seal_type)).scalar_one())
    finally:
        db.dispose()


def bind(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """A listening socket for the workers to inherit.

    Not ``shared``: one per process that listens on the port, with SO_REUSEPORT (XKS's listener). ``shared``
    (the REST and KMIP ports of several workers): one socket that every worker accepts from. On the REST
    port the worker holding the fewest connections accepts (keysteward.server.accept_balance). On the KMIP
    port, whichever worker's event loop is free accepts: vCenter opens a new connection for almost every
    operation, and with a socket per worker the kernel's hash of the addresses handed each to a worker
    whether it was busy or not. Measured on two workers (a new connection per operation, 16 clients, six
    runs alternating with a socket per worker): 531 against 416 operations/s and a p99 of 53 against 95 ms
    in the medians. A worker that hangs strands no new connection either: the others go on accepting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if not shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)  # a boot storm's agents connect at once; the kernel caps it at net.core.somaxconn
    sock.set_inheritable(True)
    return sock


def _kmip_socket(settings: Settings) -> socket.socket | None:
    """The shared KMIP socket when ``[kmip] listen`` is set; a bad address or a port in use fails the start."""
    if not settings.kmip.listen:
        return None
    try:
        return bind(*listen_address(settings.kmip.listen, "kmip.listen"), shared=True)
    except OSError as exc:
        problem = f"cannot listen on {settings.kmip.listen}: {exc.strerror}"
        raise BadRequest(problem, code="kmip_listen_failed") from None


def supervise(settings: Settings) -> int:
    count = settings.server.workers
    if _seal_type(settings) == "shamir":
        raise BadRequest(
            "server.workers > 1 needs a seal that unseals by itself (pkcs11): with Shamir shares every worker "
            "would need its own unseal; run one process per server and add servers on PostgreSQL instead",
            code="workers_need_auto_unseal",
        )
    if settings.xks.listen:  # each worker binds its own XKS socket: a bad address fails here, not in each
        listen_address(settings.xks.listen, "xks.listen")
    rest = bind(settings.server.listen_host, settings.server.listen_port, shared=True)
    board = new_board(count)
    kmip = _kmip_socket(settings)
    shared: tuple[int, ...] = (rest.fileno(), board)
    # only this supervisor's KMIP socket and session store: never a number left in its own environment
    own = (KMIP_FD, BOARD_FD, tls_sessions.STORE_FD)
    inherited = {name: value for name, value in os.environ.items() if name not in own}
    sessions: int | None = None
    if kmip is not None:  # with the store of its TLS sessions, which every worker resumes (tls_sessions.py)
        sessions = tls_sessions.new_store()
        shared += (kmip.fileno(), sessions)
        inherited.update({KMIP_FD: str(kmip.fileno()), tls_sessions.STORE_FD: str(sessions)})
    argv = [sys.executable, "-c", "from keysteward.server.run import worker_main; worker_main()"]
    secret = tls_tickets.new_secret()  # one per start: every worker resumes the sessions the others began
    workers = []
    for index in range(count):
        tickets = tls_tickets.pipe_for_worker(secret)
        try:
            env = {**inherited, "KEYSTEWARD_DATA_DIR": str(settings.data_dir), WORKER_FD: str(rest.fileno())}
            env.update({BOARD_FD: str(board), WORKER_INDEX: str(index), tls_tickets.TICKET_FD: str(tickets)})
            workers.append(subprocess.Popen(argv, env=env, pass_fds=(tickets, *shared)))
        finally:
            os.close(tickets)
    del secret
    if sessions is not None:
        os.close(sessions)  # each worker maps the store and closes its descriptor
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != SEAL_SIGNAL:
            stopping = True
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM if signum != SEAL_SIGNAL else SEAL_SIGNAL)

    for sig in (signal.SIGTERM, signal.SIGINT, SEAL_SIGNAL):
        signal.signal(sig, forward)
    log.info("supervising %d workers on %s:%d", count, settings.server.listen_host, settings.server.listen_port)
    try:
        while not stopping:
            if any(w.poll() is not None for w in workers):
                log.error("a worker exited; stopping the others")
                forward(signal.SIGTERM, None)
                break
            time.sleep(0.2)
    finally:
        for w in workers:
            try:
                w.wait(15)
            except subprocess.TimeoutExpired:
                w.kill()
        rest.close()
        os.close(board)
        if kmip is not None:
            kmip.close()
    return 0 if stopping and all(w.returncode in (0, -signal.SIGTERM) for w in workers) else 1
