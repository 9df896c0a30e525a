"""High availability under faults: one etcd, two PostgreSQL 15 nodes under Patroni (synchronous mode,
strict), two keysteward servers on that database, and a load of releases and renewals from the agent's
client given both servers' URLs (tests/support/ha_load.py).

The tests run in order on one cluster (each leaves it with a leader and a synchronous standby):

1. SIGKILL one keysteward server: the load goes on at the other within 2 s; every answered release has
   its lease and its audit record; no renewal is refused, no clone suspected.
2. SIGKILL the PostgreSQL primary's node (Patroni and PostgreSQL): Patroni promotes the synchronous
   standby, the servers reconnect by themselves, the old node (its Patroni restarted) rejoins as the
   synchronous standby and writes resume (with two nodes in strict mode the new primary commits nothing
   until it has a standby: docs/ha.md); every acknowledged release is there, ``audit verify`` passes.
3. Stop the standby: writes answer 503 ``database_unavailable`` (strict mode: no commit without the
   standby's confirmation), reads still answer; with the standby back, both nodes hold the same chain.
4. SIGSTOP the primary's node (hung, not dead): the standby is promoted; the old primary, thawed, steps
   down and becomes its standby (never two leaders), writes resume on the new primary, nothing
   acknowledged is lost.

Timings are shortened to keep the family bounded (a few minutes here): Patroni ttl 15 s, loop_wait 2 s,
retry_timeout 5 s (tests/support/patroni.py), and keysteward's ``database_timeout_seconds`` 3 s. With
Patroni's defaults (ttl 30) a failover takes about 30 s instead: bench/failover.py measures both.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from keysteward.devcloud.provider import DevCloud
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, free_port, init_manager
from tests.integration.test_release_api import World
from tests.support import patroni
from tests.support.ha_load import ReleaseLoad
from tests.support.pgcluster import PgUnavailable

pytestmark = pytest.mark.e2e
ACCOUNT = "111122223333"
DB_TIMEOUT = 3.0
VOLUMES = 6
LEASE_SECONDS = 120


@dataclass
class Site:
    cluster: patroni.HaCluster
    servers: list[ServerProcess]
    admin: str
    world: World
    tmp: Path
    volumes: list[tuple[str, Any]] = field(default_factory=list)

    def up(self) -> list[ServerProcess]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def load(self) -> ReleaseLoad:
        ca = str(self.servers[0].settings.server.tls_ca)
        return ReleaseLoad([s.url for s in self.servers], ca, "acme", self.world.cloud, self.volumes).start()

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The admin API at the first server that is up (the test's own view, not the load's)."""
        server = self.up()[0]
        with server.http(self.admin) as c:
            return c.request(method, path, **kw)

    def audit_text(self) -> str:
        records, after = [], 0
        while True:
            page = self.api("GET", "/audit", params={"after": after, "limit": 5000}).json()["records"]
            records += [r["body"] for r in page]
            if len(page) < 5000:
                return "\n".join(records)
            after = int(page[-1]["seq"])

    def verify_audit(self) -> dict[str, Any]:
        out = self.up()[0].cli("audit", "verify", "--json", token=self.admin)
        return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, secret_registry: SecretRegistry) -> Iterator[Site]:
    try:
        cluster = patroni.start()
    except PgUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    tmp = tmp_path_factory.mktemp("ha")
    servers: list[ServerProcess] = []
    try:
        leader = cluster.wait_for("leader", 30)
        cluster.admin_sql(leader, "CREATE DATABASE keysteward")
        out = init_manager(tmp / "a", secret_registry, db_url=cluster.url("keysteward"))
        text = (tmp / "a" / "keysteward.toml").read_text()
        (tmp / "b").mkdir()
        port_a = str(out.settings.server.listen_port)
        (tmp / "b" / "keysteward.toml").write_text(
            text.replace(f"listen_port = {port_a}", f"listen_port = {free_port()}")
        )
        env = {"KEYSTEWARD_STORAGE_DATABASE_TIMEOUT_SECONDS": str(DB_TIMEOUT)}
        servers = [ServerProcess(tmp / n, secret_registry, env).start() for n in ("a", "b")]
        manager = ProcessManager(servers[0], out.root_token.secret, secret_registry)
        world = World(manager, DevCloud.init(tmp / "devcloud"))  # type: ignore[arg-type]
        site = Site(cluster, servers, world.admin, world, tmp)
        for n in range(VOLUMES):
            vm = world.cloud.create(account=ACCOUNT, image_id="img-ha")
            binding = {"provider": "devcloud", "account": ACCOUNT, "instance_id": vm.id}
            # leases outlive a database failover (docs/ha.md): renewals fail while no write can commit
            volume_id, _ = world.volume(f"ha-{n}", binding, lease_seconds=LEASE_SECONDS)
            site.volumes.append((volume_id, vm))
        yield site
        manager.client.close()
    finally:
        for server in servers:
            server.stop()
        cluster.stop()
        shutil.rmtree(tmp / "devcloud", ignore_errors=True)


def _answered_are_all_there(site: Site, load: ReleaseLoad) -> None:
    """Every release the load was answered has its lease and its audit record; renewals all continued."""
    leases = {lease["id"]: lease for lease in site.api("GET", "/leases").json()}
    audit = site.audit_text()
    releases = load.releases()
    assert releases, "the load had no release answered"
    missing = [a for a in releases if a.lease_id not in leases]
    unaudited = [a for a in releases if a.lease_id not in audit]
    assert missing == [] and unaudited == [], (missing[:3], unaudited[:3])
    actions = {a.action for a in load.answered if a.kind == "renew"}
    assert actions <= {"continue"}, actions
    assert "suspected_clone" not in audit and not [f for f in load.failed if f.code == "suspected_clone"]


def _healthy(site: Site, timeout: float = 60) -> None:
    """A leader and a synchronous standby that has caught up: both on one timeline, the standby's lag known and
    small (a standby still replaying an older timeline is no failover target yet, whatever its role says)."""
    cluster = site.cluster
    cluster.wait_for("leader", timeout)
    cluster.wait_for("sync_standby", timeout)
    deadline = time.monotonic() + timeout
    while True:
        members = cluster.members()
        timelines = {m.get("timeline") for m in members}
        lags = [m.get("lag") for m in members if m.get("role") != "leader"]
        if len(members) == 2 and len(timelines) == 1 and all(isinstance(lag, int) and lag < 1 << 20 for lag in lags):
            return
        assert time.monotonic() < deadline, f"the standby never caught up with the leader: {members}"
        time.sleep(0.3)


def test_1_a_keysteward_server_killed_the_load_goes_on(site: Site) -> None:
    load = site.load()
    try:
        load.wait_release_after(time.monotonic(), 20)
        time.sleep(1.0)
        victim = site.servers[0]
        killed = time.monotonic()
        victim.kill()
        took = load.wait_release_after(killed, 10)
        time.sleep(2.0)
    finally:
        load.stop()
    assert took < 2.0, f"first release on the other server after {took:.2f} s"
    assert [f for f in load.failed if f.at > killed + took] == [], load.failed[-3:]
    # leases the dead server made are renewed by the other: the same lease goes on (the client used the
    # first URL, the killed server, until it died)
    before = {a.lease_id for a in load.releases() if a.at < killed}
    moved = [a for a in load.answered if a.kind == "renew" and a.started > killed and a.lease_id in before]
    assert moved and {a.action for a in moved} == {"continue"}, moved
    _answered_are_all_there(site, load)
    victim.start()  # back for the next tests


def test_2_the_primary_killed_the_standby_takes_over_nothing_acknowledged_lost(site: Site) -> None:
    cluster = site.cluster
    old = cluster.wait_for("leader", 30)
    load = site.load()
    try:
        load.wait_release_after(time.monotonic(), 20)
        time.sleep(1.0)
        killed = cluster.kill_node(old)
        new = cluster.wait_for("leader", 60, not_node=old)
        promoted = time.monotonic() - killed
        # two nodes, strict: the new primary commits nothing until a synchronous standby is back; the
        # old node's Patroni restarts (systemd's Restart= in packaging/ha/) and rejoins as that standby
        cluster.start_node(old)
        took = load.wait_release_after(killed, 90)
        time.sleep(2.0)
    finally:
        load.stop()
    assert new is not old
    assert promoted < 30 and took < 90, (promoted, took)
    _answered_are_all_there(site, load)
    verified = site.verify_audit()
    assert verified["ok"] is True, verified
    assert cluster.wait_for("sync_standby", 90) is old
    assert cluster.admin_sql(old, "SELECT pg_is_in_recovery()") == [(True,)]


def test_3_no_standby_writes_answer_503_reads_answer_nothing_diverges(site: Site) -> None:
    cluster = site.cluster
    _healthy(site)
    standby = cluster.wait_for("sync_standby", 30)
    primary = cluster.wait_for("leader", 30)
    cluster.stop_node(standby)
    try:
        started = time.monotonic()
        r = site.api("POST", "/keys", json={"name": "while-alone"})
        assert r.status_code == 503 and r.json()["code"] == "database_unavailable", r.text
        assert time.monotonic() - started < DB_TIMEOUT + 10
        volume_id, vm = site.volumes[0]  # a release is a write too: the same 503, through the agent's client
        load = ReleaseLoad([s.url for s in site.up()], str(site.servers[0].settings.server.tls_ca), "acme",
                           site.world.cloud, [(volume_id, vm)])  # fmt: skip
        load.start()
        time.sleep(DB_TIMEOUT * 2 + 2)
        load.stop()
        assert load.releases() == [] and load.failed, load.answered
        assert all("database_unavailable" in f.message for f in load.failed if f.kind == "release"), load.failed
        # reads still answer (the key list, the leases)
        assert site.api("GET", "/keys").status_code == 200
        assert site.api("GET", "/leases").status_code == 200
    finally:
        cluster.start_node(standby)
    assert cluster.wait_for("sync_standby", 90) is standby
    # nothing diverges: once caught up, the standby holds the primary's audit heads exactly
    query = "SELECT tenant_id, seq, hash FROM audit_heads ORDER BY tenant_id"
    deadline = time.monotonic() + 30
    while True:
        a = _db_sql(cluster, primary, query)
        b = _db_sql(cluster, standby, query)
        if a == b or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert a == b and a
    assert site.api("POST", "/keys", json={"name": "after-standby-back"}).status_code == 201
    assert site.verify_audit()["ok"] is True


def _db_sql(cluster: patroni.HaCluster, node: patroni.Node, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=node.pg_port, user=cluster.user, dbname="keysteward",
                         connect_timeout=3) as conn:  # fmt: skip
        return list(conn.execute(sql).fetchall())


def test_4_a_hung_primary_no_split_brain_writes_resume(site: Site) -> None:
    """A primary frozen (SIGSTOP) while serving: the standby is promoted, and when the hung node wakes there is
    never a second primary; no acknowledged write is lost; writes resume once a synchronous standby is back.

    Which node leads at the end is Patroni's business. A node Patroni cannot bring back as a standby (its log
    says the primary's timeline is behind its own: it wrote WAL the other never saw) is reinitialized from
    the leader after 45 s, the operator's step of docs/ha.md."""
    cluster = site.cluster
    _healthy(site)
    old = cluster.wait_for("leader", 30)
    load = site.load()
    frozen: list[int] = []
    reinitialized: list[str] = []
    try:
        load.wait_release_after(time.monotonic(), 20)
        frozen = cluster.freeze_node(old)
        stopped = time.monotonic()
        new = cluster.wait_for("leader", 60, not_node=old)
        cluster.thaw_node(frozen)  # the hung node wakes: its leader key is gone
        frozen = []
        deadline, reinit_at = time.monotonic() + 90, time.monotonic() + 45
        while time.monotonic() < deadline:
            leaders = [m for m in cluster.members() if m.get("role") == "leader"]
            assert len(leaders) <= 1, leaders
            leader = cluster.role_of("leader")
            if leader is not None and _sync_streaming(cluster, leader):
                break
            if leader is not None and not reinitialized and time.monotonic() > reinit_at:
                stuck = next(n for n in cluster.nodes if n is not leader)
                if stuck.post("/reinitialize", {"force": True}) == 200:
                    reinitialized.append(stuck.name)
            time.sleep(0.3)
        try:
            took = load.wait_release_after(stopped, 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nmembers: {cluster.members()}\n{cluster.logs(40)}") from None
        time.sleep(2.0)
    finally:
        cluster.thaw_node(frozen)
        load.stop()
    assert new is not old and took < (150 if reinitialized else 90), (took, reinitialized)
    # a synchronous standby streams again, as the leader's PostgreSQL says (Patroni's role label can lag
    # behind a reinitialized node)
    leader = cluster.wait_for("leader", 10)
    standby = next(n for n in cluster.nodes if n is not leader)
    deadline = time.monotonic() + 90
    while not (_in_recovery(cluster, standby) and _sync_streaming(cluster, leader)):
        assert time.monotonic() < deadline, f"no synchronous standby: {cluster.members()}"
        time.sleep(0.5)
    _answered_are_all_there(site, load)
    assert site.verify_audit()["ok"] is True


def _sync_streaming(cluster: patroni.HaCluster, leader: patroni.Node) -> bool:
    sql = "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming'"
    try:
        return cluster.admin_sql(leader, sql) == [(1,)]
    except Exception:
        return False


def _in_recovery(cluster: patroni.HaCluster, node: patroni.Node) -> bool:
    try:
        return cluster.admin_sql(node, "SELECT pg_is_in_recovery()") == [(True,)]
    except Exception:
        return False
