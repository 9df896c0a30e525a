"""The REST port's workers share one listening socket, and the worker holding the fewest connections accepts.

Agents and load balancers keep their HTTPS connections open, so how a worker's share of requests is set is
how many connections it holds. A socket per worker with SO_REUSEPORT lets the kernel pick one by a hash of
the addresses, a coin toss per connection: the release bench's 32 came out 14/19 over two workers, and 40
in tests/e2e/test_rest_accept_balance.py 15/25. The worker with more keeps its clients waiting longer while
the other has less to do. One socket that every event loop accepts from was no better (14/19, 19/14 and
12/21: the loop that wakes first takes most of a burst).

So the supervisor binds the port once and gives every worker a :class:`Board`: a few bytes of shared
memory where each worker writes how many connections it holds. A worker's :class:`Acceptor` takes a
connection only while it holds no more than the others. It steps aside for :data:`HOLD` seconds at a time;
a connection that has waited for :data:`OVERDUE` seconds is taken whoever holds what, so a worker that
hangs or is slow to wake strands nothing: the others take its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import uvicorn

log = logging.getLogger("keysteward.server")

BOARD_FD = "KEYSTEWARD_WORKER_BOARD_FD"
"""The board's shared memory (a memfd), passed by the supervisor to each worker."""
WORKER_INDEX = "KEYSTEWARD_WORKER_INDEX"
"""The worker's slot on the board."""
SLOT = 8
HOLD = 0.002
"""How long a worker that holds more connections than another waits before it looks again."""
OVERDUE = 0.02
"""A connection that has waited this long is accepted by whichever worker sees it."""


def new_board(workers: int) -> int:
    """The supervisor's side: a zeroed shared memory file of one slot per worker (its descriptor)."""
    fd = os.memfd_create("keysteward-workers", 0)
    os.ftruncate(fd, SLOT * workers)
    return fd


class Board:
    """How many connections each worker holds: its own slot written by each, every slot read by all."""

    def __init__(self, fd: int, index: int) -> None:
        size = os.fstat(fd).st_size
        if size < SLOT or size % SLOT or not 0 <= index < size // SLOT:
            raise ValueError(f"worker board of {size} bytes has no slot {index}")
        self._map = mmap.mmap(fd, size)
        self._slots = memoryview(self._map).cast("q")
        self.index = index

    def set(self, count: int) -> None:
        self._slots[self.index] = count

    def fewest(self) -> bool:
        """Does this worker hold no more connections than any other?"""
        slots = self._slots
        mine = slots[self.index]
        return all(mine <= n for i, n in enumerate(slots) if i != self.index)


class Acceptor:
    """Accepts from a shared listening socket when :class:`Board` says so, and hands each connection to the
    loop with a protocol of ``factory`` (a :class:`keysteward.netlimits.Listener`'s guard: connection caps
    and the TLS handshake, then uvicorn's). Stands in uvicorn's list of servers: ``close`` stops it."""

    def __init__(self, sock: socket.socket, factory: Callable[[], Any], board: Board) -> None:
        self._sock = sock
        self._factory = factory
        self._board = board
        self._loop = asyncio.get_running_loop()
        self._held: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None
        self._open = 0
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        while not self._closed:
            if not self._board.fewest():
                now = time.monotonic()
                if self._waiting_since is None:
                    self._waiting_since = now
                if now - self._waiting_since < OVERDUE:
                    self._hold()
                    return
                # overdue: the worker that should take it does not (busy, or hung). Take one, and the next
                # only once it is overdue in turn: a worker busy with a burst of handshakes would otherwise
                # lose the whole burst to this one
                self._waiting_since = now
            try:
                conn, _peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                self._waiting_since = None
                return
            except OSError as exc:  # out of descriptors or memory: try again a little later
                log.warning("accept failed: %s", exc.strerror)
                self._hold()
                return
            self._count(+1)
            self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        guard = self._factory()
        done = [False]

        def lost() -> None:
            if not done[0]:
                done[0] = True
                self._count(-1)

        def settled(task: asyncio.Task[Any]) -> None:
            if task.cancelled() or task.exception() is not None:  # never connected: no connection_lost comes
                conn.close()
                lost()

        guard.on_lost = lost
        self._loop.create_task(self._loop.connect_accepted_socket(lambda: guard, conn)).add_done_callback(settled)

    def _count(self, delta: int) -> None:
        self._open += delta
        self._board.set(self._open)

    def _hold(self) -> None:
        if self._held is None:
            self._loop.remove_reader(self._sock.fileno())
            self._held = self._loop.call_later(HOLD, self._resume)

    def _resume(self) -> None:
        self._held = None
        if self._closed:
            return
        if not select.select([self._sock], [], [], 0)[0]:
            self._waiting_since = None  # another worker took what waited: the next one waits afresh
        self._loop.add_reader(self._sock.fileno(), self._ready)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._held is not None:
            self._held.cancel()
        else:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        return None


class BalancedServer(uvicorn.Server):
    """uvicorn's server with an :class:`Acceptor` in place of the loop's own server on ``sock``."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, board: Board) -> None:
        super().__init__(config)
        self._ks_sock = sock
        self._ks_board = board

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan and uvicorn's state, no server of its own
        if self.should_exit:
            return
        config = self.config

        def protocol() -> Any:  # what uvicorn's own create_protocol makes
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        self.servers.append(Acceptor(self._ks_sock, protocol, self._ks_board))  # type: ignore[arg-type]
