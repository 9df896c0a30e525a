"""With several workers the KMIP port is one listening socket that every worker accepts from
(``bind(shared=True)`` in keysteward/server/supervisor.py), against a real ``keysteward server start`` with two
workers:

- both workers hold the same listening socket, and it is the only one on the port;
- a socket number left in the supervisor's own environment is never taken for the KMIP socket;
- a worker that hangs strands no new connection: with one worker stopped, every new connection is answered
  by the other. With a socket per worker (SO_REUSEPORT) the kernel would queue about half of them at the
  stopped worker, where they would wait until it ran again.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from keysteward.server.supervisor import KMIP_FD
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.support.kmip_client import KmipConn
from tests.support.kmip_site import KmipSite, make_kmip_site
from tests.support.workers import listening_inodes, socket_inodes, wait_stopped, worker_pids

pytestmark = pytest.mark.e2e


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(tmp_path, server_factory, secret_registry, env={"KEYSTEWARD_SERVER_WORKERS": "2"})


def _workers(site: KmipSite) -> list[int]:
    assert site.server.proc is not None
    return worker_pids(site.server.proc.pid)


def test_the_workers_accept_from_one_socket(site: KmipSite) -> None:
    listening = listening_inodes(site.port)
    assert len(listening) == 1, "one listening socket on the KMIP port, not one per worker"
    for pid in _workers(site):
        assert listening <= socket_inodes(pid), f"worker {pid} does not hold the KMIP listening socket"


def test_a_hung_worker_strands_no_new_connection(site: KmipSite) -> None:
    cert, key, _ = site.issue("esx-1")
    ctx = site.tls((cert, key))
    site.wait_served(ctx)
    stopped = _workers(site)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        wait_stopped(stopped)
        answered = 0
        for _ in range(24):
            try:
                with KmipConn(site.port, ctx, timeout=10) as c:
                    answered += c.one("DiscoverVersions").ok
            except TimeoutError:
                pass
        assert answered == 24, f"{24 - answered} of 24 new connections waited for the stopped worker"
    finally:
        os.kill(stopped, signal.SIGCONT)
    with KmipConn(site.port, ctx) as c:  # and the stopped worker serves again
        assert c.one("DiscoverVersions").ok


def test_a_socket_number_left_in_the_environment_is_not_taken_for_the_kmip_socket(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    env = {"KEYSTEWARD_SERVER_WORKERS": "2", KMIP_FD: "0"}  # no [kmip] listen: the workers get no KMIP socket
    server = server_factory(tmp_path / "ks", env=env)
    with server.http(out.root_token.secret) as c:
        assert c.get("/health").status_code == 200
