"""A throw-away PostgreSQL HA cluster on 127.0.0.1: one etcd, two PostgreSQL 15 nodes under Patroni, in
synchronous mode, strict (a write with no synchronous standby waits, then keysteward answers 503).

No pytest here: tests/e2e/test_ha_faults.py and bench/failover.py both use it. The nodes run as the
``postgres`` system user when we are root (PostgreSQL refuses root). Timings are short on purpose
(:class:`Timings`): Patroni's defaults (ttl 30, loop_wait 10, retry_timeout 10) make a failover take
about 30 s; the tests and ``bench/failover.py --quick`` use ttl 15, loop_wait 2, retry_timeout 5
(``loop_wait + 2 * retry_timeout <= ttl`` as Patroni wants). Shorter ones (ttl 8, loop_wait 1) flapped
here under a load average of 18: a just-promoted leader failed to renew its lock in time, the thawed old
primary took it back, and the replica left on a newer timeline could not follow it without a reinit.
packaging/ha/ keeps the defaults.

Faults, as an operator would meet them:

- :meth:`HaCluster.kill_node`: SIGKILL of Patroni and of every PostgreSQL process of a node (a crash);
- :meth:`HaCluster.stop_node`: a clean stop (Patroni stops its PostgreSQL);
- :meth:`HaCluster.freeze_node` / :meth:`thaw_node`: SIGSTOP / SIGCONT of the whole node (a hung VM);
- :meth:`HaCluster.start_node`: the node's Patroni again; it rejoins as a standby (pg_rewind if needed).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.pgcluster import PG_BINDIR, PG_USER, PgUnavailable

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
PATRONI = shutil.which("patroni") or "/usr/bin/patroni"
SCOPE = "keysteward-test"


@dataclass(frozen=True)
class Timings:
    ttl: int = 15
    loop_wait: int = 2
    retry_timeout: int = 5


DEFAULT_TIMINGS = Timings(ttl=30, loop_wait=10, retry_timeout=10)
"""Patroni's own defaults (the production set-up, packaging/ha/)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            child = int(entry.name)
            found += [child, *_children(child)]
    return found


@dataclass
class Node:
    name: str
    pg_port: int
    api_port: int
    data_dir: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def postmaster(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        """Patroni (and runuser), the postmaster and its children."""
        pids = []
        if self.proc is not None and self.proc.poll() is None:
            pids += [self.proc.pid, *_children(self.proc.pid)]
        master = self.postmaster()
        if master is not None and Path(f"/proc/{master}").exists():
            pids += [master, *_children(master)]
        return sorted(set(pids))

    def api(self, path: str, timeout: float = 2.0) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}", timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, body: dict[str, Any], timeout: float = 10.0) -> int:
        """POST to this node's Patroni REST API (``/reinitialize``...); the HTTP status."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310 - http://127.0.0.1 only
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


@dataclass
class HaCluster:
    base: Path
    etcd_port: int
    nodes: list[Node]
    timings: Timings
    etcd: subprocess.Popen[bytes] | None = None
    etcd_dir: Path | None = None
    user: str = PG_USER
    _owner: tuple[int, int] | None = field(default=None, repr=False)

    # -- addresses -----------------------------------------------------------------------------

    def url(self, dbname: str) -> str:
        """keysteward's database URL: libpq's host list (keysteward adds target_session_attrs=read-write)."""
        hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in self.nodes)
        return f"postgresql+psycopg://{self.user}@{hosts}/{dbname}"

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def members(self) -> list[dict[str, Any]]:
        for node in self.nodes:
            try:
                return list(node.api("/cluster").get("members", []))
            except (OSError, urllib.error.URLError, ValueError):
                continue
        return []

    def role_of(self, role: str) -> Node | None:
        """The node Patroni reports as ``leader`` or ``sync_standby`` and running (None if none)."""
        for member in self.members():
            if member.get("role") == role and member.get("state") in ("running", "streaming"):
                return self.node(str(member["name"]))
        return None

    def wait_for(self, role: str, timeout: float, *, not_node: Node | None = None) -> Node:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.role_of(role)
            if found is not None and found is not not_node:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no {role} within {timeout} s: {self.members()}\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for node in self.nodes:
            try:
                tail = node.log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = []
            out.append(f"--- {node.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def admin_sql(self, node: Node, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=node.pg_port, user=self.user, dbname="postgres", autocommit=True, connect_timeout=3
        ) as conn:
            cur = conn.execute(sql)
            return list(cur.fetchall()) if cur.description else []

    # -- faults --------------------------------------------------------------------------------

    def kill_node(self, node: Node) -> float:
        """SIGKILL every process of the node; the monotonic time once the last signal is sent (finding the
        processes takes a while: a fault's clock starts here, not before)."""
        pids = node.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed = time.monotonic()
        if node.proc is not None:
            node.proc.wait(10)
        return killed

    def stop_node(self, node: Node, timeout: float = 30) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)  # runuser passes it on; Patroni stops PostgreSQL
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_node(node)
        master = node.postmaster()
        if master is not None and Path(f"/proc/{master}").exists():
            self.kill_node(node)

    def freeze_node(self, node: Node) -> list[int]:
        """SIGSTOP every process of the node; the pids, to thaw."""
        pids = node.pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    def thaw_node(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    # -- life ----------------------------------------------------------------------------------

    def start_node(self, node: Node) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        log = node.log.open("ab")
        node.proc = subprocess.Popen(
            [*prefix, PATRONI, str(node.config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self.base,
        )  # fmt: skip
        log.close()

    def stop(self) -> None:
        for node in self.nodes:
            try:
                self.kill_node(node)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.kill()
            self.etcd.wait(10)
        if self.etcd_dir is not None:
            shutil.rmtree(self.etcd_dir, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _node_config(cluster: HaCluster, node: Node) -> dict[str, Any]:
    t = cluster.timings
    sock = cluster.base / f"sock-{node.name}"
    return {
        "scope": SCOPE,
        "name": node.name,
        "log": {"level": "INFO"},
        "restapi": {"listen": f"127.0.0.1:{node.api_port}", "connect_address": f"127.0.0.1:{node.api_port}"},
        "etcd3": {"hosts": [f"127.0.0.1:{cluster.etcd_port}"]},
        "bootstrap": {
            "dcs": {
                "ttl": t.ttl, "loop_wait": t.loop_wait, "retry_timeout": t.retry_timeout,
                "maximum_lag_on_failover": 1048576,
                "synchronous_mode": True, "synchronous_mode_strict": True,
                "postgresql": {
                    "use_pg_rewind": True, "use_slots": True,
                    "parameters": {
                        "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                        "max_wal_senders": 10, "max_replication_slots": 10, "max_connections": 200,
                        "synchronous_commit": "on",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
            "pg_hba": [
                "local all all trust", "host replication all 127.0.0.1/32 trust", "host all all 127.0.0.1/32 trust",
            ],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{node.pg_port}",
            "connect_address": f"127.0.0.1:{node.pg_port}",
            "data_dir": str(node.data_dir),
            "bin_dir": str(PG_BINDIR),
            "pgpass": str(cluster.base / f"pgpass-{node.name}"),
            "authentication": {
                "superuser": {"username": cluster.user},
                "replication": {"username": cluster.user},
                "rewind": {"username": cluster.user},
            },
            "parameters": {
                "unix_socket_directories": str(sock), "lc_messages": "C", "shared_buffers": "32MB",
                "fsync": "on", "wal_keep_size": "64MB",
            },
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }  # fmt: skip


def start(
    timings: Timings | None = None, *, prefix: str = "ks-ha-", timeout: float = 90, nodes_count: int = 2
) -> HaCluster:
    """etcd, then two (or ``nodes_count``) Patroni nodes; returns once there is a leader and a synchronous
    standby (and, with three, the third node streaming too)."""
    for tool in (ETCD, PATRONI, str(PG_BINDIR / "postgres")):
        if not Path(tool).is_file():
            raise PgUnavailable(f"{tool} not found: run `bash scripts/bootstrap.sh` (patroni, etcd-server, postgresql)")
    base = Path(tempfile.mkdtemp(prefix=prefix))
    owner = None
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_USER)
        owner = (pw.pw_uid, pw.pw_gid)
    nodes = []
    for name in [f"pg{i + 1}" for i in range(nodes_count)]:
        nodes.append(
            Node(name, _free_port(), _free_port(), base / name / "data", base / f"{name}.yml", base / f"{name}.log")
        )
    cluster = HaCluster(base, _free_port(), nodes, timings or Timings(), _owner=owner)
    try:
        peer = _free_port()
        # etcd's fsyncs on a loaded machine took seconds: the leader's lock renewals then failed and a
        # just-promoted leader stepped down. Its data on tmpfs here (a test's etcd holds nothing durable).
        shm = Path("/dev/shm")
        etcd_dir = Path(tempfile.mkdtemp(prefix="ks-etcd-", dir=shm)) if shm.is_dir() else base / "etcd"
        cluster.etcd_dir = etcd_dir
        etcd_log = (base / "etcd.log").open("ab")
        cluster.etcd = subprocess.Popen(
            [ETCD, "--name", "ks", "--data-dir", str(etcd_dir),
             "--listen-client-urls", f"http://127.0.0.1:{cluster.etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{cluster.etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"ks=http://127.0.0.1:{peer}", "--logger", "zap", "--log-outputs", "stderr"],
            stdout=etcd_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        etcd_log.close()
        for node in nodes:
            (base / f"sock-{node.name}").mkdir()
            node.data_dir.parent.mkdir()
            node.config.write_text(json.dumps(_node_config(cluster, node), indent=1))  # YAML is a superset of JSON
        if owner is not None:
            for path in [base, *base.rglob("*")]:
                if not str(path).startswith(str(base / "etcd")):
                    os.chown(path, *owner)
        cluster.start_node(nodes[0])
        cluster.wait_for("leader", timeout)
        for node in nodes[1:]:
            cluster.start_node(node)
        cluster.wait_for("sync_standby", timeout)
        deadline = time.monotonic() + timeout
        while len([m for m in cluster.members() if m.get("state") in ("streaming", "running")]) < len(nodes):
            if time.monotonic() > deadline:
                raise PgUnavailable(f"not every node joined the cluster:\n{cluster.logs()}")
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        raise
    return cluster
