"""PostgreSQL behind a failover (Patroni, a synchronous standby): what keysteward's connections need.

- :func:`engine_url`: a libpq multi-host URL (``postgresql+psycopg://u@h1:5432,h2:5432/db``) becomes the
  form SQLAlchemy passes to psycopg (``?host=h1:5432&host=h2:5432``); with several hosts,
  ``target_session_attrs=read-write`` is added unless given (libpq then skips standbys), and a
  ``connect_timeout`` unless given (libpq tries the next host once it expires, per host).
- :func:`connect_args`: ``statement_timeout`` on every session (a statement stuck on a lock ends).
- :class:`Guard`: the connection checkout of the pool. A connection idle for a while is pinged before it
  is handed out (a dead one is replaced: SQLAlchemy retries the checkout, never a transaction), and every
  checked-out connection has a deadline. Past it, the guard sends the server a cancel request: that is
  what ends a commit waiting for a synchronous standby that is gone (strict mode; ``statement_timeout``
  does not end that wait, PostgreSQL only checks for a cancel). A connection still checked out
  :data:`DEADLINE_MARGIN` seconds later (a hung primary: SIGSTOP, a frozen VM, whose kernel still
  acknowledges TCP) has its socket shut down, so the waiting query fails at once with a disconnect
  instead of blocking the request (and the pool) until the node wakes.
- :func:`watch_notices` and :func:`commit_was_cancelled`: a commit whose synchronous replication wait
  was cancelled comes back from libpq as a success with only a WARNING notice ("canceling wait for
  synchronous replication ... The transaction has already committed locally, but might not have been
  replicated to the standby"). The notice is caught on the connection, and the caller turns the commit
  into a failure (:data:`SYNC_CANCELLED`): it may be lost in a failover, so it is never reported as done.
  The texts are PostgreSQL's English ones: the servers run with ``lc_messages = 'C'`` (packaging/ha/).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import Engine, event, exc

SYNC_CANCELLED = "the commit was not confirmed by the synchronous standby (it may be lost in a failover)"
NOTICES = "ks_notices"
CONNECT_TIMEOUT = "3"
PING_IDLE_SECONDS = 1.0
DEADLINE_MARGIN = 2.0
"""Seconds past the statement timeout before the guard cuts a connection (the server cancels first)."""

_SYNC_TEXTS = ("synchronous replication", "committed locally")


def engine_url(url: str) -> str:
    """The URL SQLAlchemy takes for ``url`` (see the module doc); a one-host URL keeps its hosts as given."""
    parts = urlsplit(url)
    netloc = parts.netloc
    user, _, hosts = netloc.rpartition("@")
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = {k for k, _ in query}
    listed = [h for h in hosts.split(",") if h] if "," in hosts else []
    several = len(listed) > 1 or sum(1 for k, _ in query if k == "host") > 1
    if listed:
        query = [(k, v) for k, v in query if k != "host"] + [("host", h) for h in listed]
        netloc = f"{user}@" if user else ""
    if several and "target_session_attrs" not in names:
        query.append(("target_session_attrs", "read-write"))
    if several and "connect_timeout" not in names:
        query.append(("connect_timeout", CONNECT_TIMEOUT))
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe=":/,"), parts.fragment))


def connect_args(timeout: float) -> dict[str, Any]:
    return {"options": f"-c statement_timeout={int(timeout * 1000)}"}


# -- the notice of a cancelled synchronous replication wait ----------------------------------------------


def watch_notices(dbapi_conn: Any) -> None:
    """Keep the WARNING notices of this psycopg connection (see :func:`commit_was_cancelled`)."""
    seen: list[str] = []
    dbapi_conn.add_notice_handler(lambda diag: _keep(seen, diag))
    setattr(dbapi_conn, NOTICES, seen)


def _keep(seen: list[str], diag: Any) -> None:
    text = f"{diag.message_primary or ''} {diag.message_detail or ''}"
    if any(t in text for t in _SYNC_TEXTS) and len(seen) < 8:
        seen.append(text[:200])


def clear_notices(dbapi_conn: Any) -> None:
    seen = getattr(dbapi_conn, NOTICES, None)
    if seen is not None:
        seen.clear()


def commit_was_cancelled(dbapi_conn: Any) -> bool:
    """True when the last commit on ``dbapi_conn`` came back with the "committed locally" warning."""
    return bool(getattr(dbapi_conn, NOTICES, None))


# -- the pool's guard ------------------------------------------------------------------------------------


class Guard:
    """Ping on checkout after idleness, and a deadline for each checked-out connection (see the module doc)."""

    def __init__(self, engine: Engine, timeout: float) -> None:
        self.timeout = timeout
        self._out: dict[int, tuple[float, Any, bool]] = {}
        """Checked-out connections: (deadline, connection, cancel sent)."""
        self._lock = threading.Lock()
        self._free = threading.local()
        self._stop = threading.Event()
        self._bad_since = 0.0
        """When a connection last failed (cut or ping): connections made before are not pinged, just replaced."""
        self._preferred: tuple[str, str] | None = None
        """The (host, port) of the last new connection: tried first by the next (libpq tries hosts in order)."""
        event.listen(engine, "do_connect", self._on_do_connect)
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        event.listen(engine, "close", self._on_checkin)
        self._thread = threading.Thread(target=self._watch, name="keysteward-db-guard", daemon=True)
        self._thread.start()

    @contextmanager
    def unbounded(self) -> Iterator[None]:
        """Connections checked out by this thread inside get no deadline (migrations, backups)."""
        self._free.on = True
        try:
            yield
        finally:
            self._free.on = False

    def _on_do_connect(self, _dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        hosts, ports = str(cparams.get("host", "")).split(","), str(cparams.get("port", "")).split(",")
        if self._preferred is None or len(hosts) < 2 or len(ports) != len(hosts):
            return
        pairs = list(zip(hosts, ports, strict=True))
        if self._preferred in pairs:
            pairs.remove(self._preferred)
            pairs.insert(0, self._preferred)
            cparams["host"], cparams["port"] = ",".join(h for h, _ in pairs), ",".join(p for _, p in pairs)

    def _on_connect(self, dbapi_conn: Any, record: Any) -> None:
        watch_notices(dbapi_conn)
        now = time.monotonic()
        record.info["ks_idle_since"] = now
        record.info["ks_born"] = now
        try:
            self._preferred = (str(dbapi_conn.info.host), str(dbapi_conn.info.port))
        except Exception:  # noqa: BLE001, S110 - only an ordering hint
            pass

    def _on_checkout(self, dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if record.info.get("ks_born", 0.0) < self._bad_since:  # from before a database failure: likely dead too
            raise exc.DisconnectionError("a pooled connection from before a database failure")
        free = getattr(self._free, "on", False)
        if not free:
            with self._lock:
                self._out[id(dbapi_conn)] = (time.monotonic() + self.timeout, dbapi_conn, False)
        if time.monotonic() - record.info.get("ks_idle_since", 0.0) > PING_IDLE_SECONDS:
            try:
                dbapi_conn.execute("SELECT 1")
                dbapi_conn.rollback()
            except Exception as err:
                self._forget(dbapi_conn)
                self._bad_since = time.monotonic()
                raise exc.DisconnectionError("a pooled connection failed its ping") from err

    def _on_checkin(self, dbapi_conn: Any, record: Any) -> None:
        self._forget(dbapi_conn)
        if record is not None:
            record.info["ks_idle_since"] = time.monotonic()

    def _forget(self, dbapi_conn: Any) -> None:
        with self._lock:
            self._out.pop(id(dbapi_conn), None)

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            cancels, cuts = [], []
            with self._lock:
                for key, entry in list(self._out.items()):
                    if entry[0] >= now:
                        continue
                    if entry[2]:  # cancelled a margin ago and still out: the server does not answer
                        del self._out[key]
                        cuts.append(entry[1])
                    else:
                        self._out[key] = (now + DEADLINE_MARGIN, entry[1], True)
                        cancels.append(entry[1])
            for conn in cancels:
                threading.Thread(target=cancel, args=(conn,), name="keysteward-db-cancel", daemon=True).start()
            if cuts:
                self._bad_since = time.monotonic()
            for conn in cuts:
                cut(conn)

    def close(self) -> None:
        self._stop.set()


def cancel(dbapi_conn: Any) -> None:
    """Ask the server to cancel what the connection runs (a commit's wait for the standby ends with a warning)."""
    try:
        dbapi_conn.cancel_safe(timeout=DEADLINE_MARGIN)
    except Exception:  # noqa: BLE001, S110 - the cut that follows ends a connection that cannot be cancelled
        pass


def cut(dbapi_conn: Any) -> None:
    """Shut the connection's socket down: whatever waits on it fails now with a disconnect."""
    try:
        fd = dbapi_conn.pgconn.socket
        sock = socket.socket(fileno=fd)
    except Exception:  # noqa: BLE001 - already closed: nothing waits on it
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # the fd stays psycopg's to close
