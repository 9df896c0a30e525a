"""Issue 11 item 8 against real server processes: an anonymous client cannot block a Shamir unseal.

The attacker knows the cluster id (``/sys/status`` shows it) and the share format, so it can make a
share with the right cluster id and a valid checksum; it connects from its own loopback address
(127.0.0.2, 127.0.0.3) while the custodians use 127.0.0.1.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from keysteward.formats import share as share_codec
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import wait_for

pytestmark = pytest.mark.e2e


def client_from(server: ServerProcess, source: str, token: str | None = None) -> httpx.Client:
    """An HTTPS client of ``server`` whose connections come from the loopback address ``source``."""
    ctx = ssl.create_default_context(cafile=server.settings.server.tls_ca)
    transport = httpx.HTTPTransport(verify=ctx, local_address=source)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url + "/v1", transport=transport, headers=headers, timeout=30)


def sealed_status(server: ServerProcess) -> dict:
    """``server status --json`` of a sealed server: it exits 2, as Vault's does."""
    r = server.cli("server", "status", "--json", check=False)
    assert r.returncode == 2, r.stderr
    return dict(json.loads(r.stdout))


def forge(cluster_id: str, index: int) -> str:
    """A share as an attacker makes it: this cluster's id, a real index, a valid checksum, a random value."""
    return share_codec.encode(share_codec.Share(bytes.fromhex(cluster_id), index, secrets.token_bytes(32)))


def progress(c: httpx.Client) -> int:
    return int(c.get("/sys/status").json()["progress"])


def test_forged_share_and_anonymous_reset_leave_progress_alone(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry, seal="shamir")
    shares, cluster_id = out.result.shares, out.result.cluster_id
    server = server_factory(tmp_path / "ks")
    with client_from(server, "127.0.0.1") as custodian, client_from(server, "127.0.0.2") as attacker:
        assert custodian.post("/sys/unseal", json={"share": shares[0]}).json()["progress"] == 1
        for index in (2, 3, 5, 1):  # also the index of the share already given
            r = attacker.post("/sys/unseal", json={"share": forge(cluster_id, index)})
            assert r.status_code == 400 and r.json()["code"] == "share_rejected", r.text
        assert attacker.post("/sys/unseal", json={"share": forge(cluster_id, 77)}).json()["code"] == (
            "share_unknown_index"
        )
        assert progress(custodian) == 1
        # anonymous reset, and a reset "proven" with a forged share, are refused
        anonymous = attacker.post("/sys/unseal/reset")
        assert anonymous.status_code == 401 and anonymous.json()["code"] == "reset_needs_share_or_token"
        r = attacker.post("/sys/unseal/reset", json={"share": forge(cluster_id, 2)})
        assert r.status_code == 400 and r.json()["code"] == "share_rejected"
        assert attacker.post("/sys/unseal/reset", headers={"authorization": "Bearer ks_forged"}).status_code == 401
        assert progress(custodian) == 1
        # the real quorum still unseals, with the progress the attacker could not touch
        assert custodian.post("/sys/unseal", json={"share": shares[4]}).json()["progress"] == 2
        done = custodian.post("/sys/unseal", json={"share": shares[2]}).json()
        assert done["sealed"] is False and done["share_commitments"] is True


def test_reset_with_a_share_or_the_root_token_through_the_cli(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry, seal="shamir")
    shares = out.result.shares
    server = server_factory(tmp_path / "ks")
    with server.http() as c:  # a load balancer sends nothing to a sealed server; a liveness probe sees it up
        sealed = c.get("/health")
        assert sealed.status_code == 503 and sealed.json()["status"] == "sealed"
        assert sealed.headers["cache-control"] == "no-store"
        assert c.get("/health", params={"sealed_ok": "true"}).status_code == 200
    server.cli("server", "unseal", shares[0])
    refused = server.cli("server", "unseal", "--reset", check=False, input="\n")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert sealed_status(server)["progress"] == 1
    reset = server.cli("server", "unseal", "--reset", input=shares[3] + "\n")
    assert "reset" in reset.stdout
    assert sealed_status(server)["progress"] == 0
    server.cli("server", "unseal", shares[1])
    server.cli("server", "unseal", "--reset", token=out.root_token.secret)
    assert sealed_status(server)["progress"] == 0
    for share in shares[:3]:
        server.cli("server", "unseal", share)
    assert server.cli_json("server", "status")["sealed"] is False  # exit 0 once unsealed
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("event") == "unsealed" and line["logger"] == "keysteward.seal" for line in lines)
    assert not [line for line in server.log_path.read_text().splitlines() if line and not line.startswith("{")]
    with server.http() as c:
        assert c.get("/health").json()["status"] == "ok"


def test_a_flood_of_bad_shares_is_rate_limited_and_the_quorum_still_unseals(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry, seal="shamir")
    shares, cluster_id = out.result.shares, out.result.cluster_id
    limit = 5
    env = {"KEYSTEWARD_SEAL_UNSEAL_FAILURES_PER_SOURCE": str(limit), "KEYSTEWARD_AUDIT_REFUSAL_INTERVAL": "0.5"}
    server = server_factory(tmp_path / "ks", env=env)
    statuses: list[int] = []
    with client_from(server, "127.0.0.1") as custodian, client_from(server, "127.0.0.3") as flooder:
        custodian.post("/sys/unseal", json={"share": shares[1]})
        for i in range(60):
            body = {"share": forge(cluster_id, 1 + i % 5)} if i % 3 else {"share": f"kss1-{i:016x}-1-00-00000000"}
            r = flooder.post("/sys/unseal", json=body)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["code"] == "rate_limited" and 0 < int(r.headers["retry-after"]) <= 60
        assert statuses[:limit] == [400] * limit and set(statuses[limit:]) == {429}, statuses
        reset = flooder.post("/sys/unseal/reset")
        assert reset.status_code == 429  # refused resets count toward the same limit
        assert progress(custodian) == 1
        # the limit is on bad shares, not on the address: a custodian behind the flooder's address still counts
        assert flooder.post("/sys/unseal", json={"share": shares[3]}).json()["progress"] == 2
        assert custodian.post("/sys/unseal", json={"share": shares[0]}).json()["sealed"] is False
    # no record per refusal: counted records (one per interval and reason), naming the source
    with server.http(out.root_token.secret) as admin:

        def flood() -> list[dict[str, Any]]:
            records = admin.get("/audit", params={"limit": 1000}).json()["records"]
            bodies = [json.loads(r["body"]) for r in records]
            return [b for b in bodies if b["action"] == "seal.unseal_share" and b["outcome"] == "denied"]

        wait_for(lambda: sum(b["details"]["count"] for b in flood()) == 60)
        counted = flood()
    assert all(b["actor"] == "anonymous" and b["details"]["sources"] == ["127.0.0.3"] for b in counted), counted
    assert len(counted) <= 60 // 4
    by_reason: dict[str, int] = {}
    for b in counted:
        by_reason[b["reason"]] = by_reason.get(b["reason"], 0) + b["details"]["count"]
    assert by_reason["rate_limited"] == 60 - limit and sum(by_reason.values()) == 60, by_reason


def test_a_cluster_from_before_commitments_gets_them_at_its_next_unseal(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry, seal="shamir")
    shares, cluster_id = out.result.shares, out.result.cluster_id
    db = sqlite3.connect(tmp_path / "ks" / "keysteward.db")
    params = json.loads(db.execute("SELECT seal_params FROM cluster").fetchone()[0])
    del params["commitments"]  # what a cluster initialised before this change holds
    db.execute("UPDATE cluster SET seal_params=?", (json.dumps(params),))
    db.commit()
    server = server_factory(tmp_path / "ks")
    with client_from(server, "127.0.0.1") as custodian:
        assert custodian.get("/sys/status").json()["share_commitments"] is False
        for share in shares[2:]:
            last = custodian.post("/sys/unseal", json={"share": share}).json()
        assert last["sealed"] is False and last["share_commitments"] is True
    stored = json.loads(db.execute("SELECT seal_params FROM cluster").fetchone()[0])["commitments"]
    db.close()
    assert sorted(stored) == ["1", "2", "3", "4", "5"]  # all five, from the three given
    with server.http(out.root_token.secret) as admin:
        assert admin.post("/sys/seal").json()["sealed"] is True
    with client_from(server, "127.0.0.1") as custodian, client_from(server, "127.0.0.2") as attacker:
        custodian.post("/sys/unseal", json={"share": shares[0]})
        assert attacker.post("/sys/unseal", json={"share": forge(cluster_id, 2)}).json()["code"] == "share_rejected"
        custodian.post("/sys/unseal", json={"share": shares[1]})
        assert custodian.post("/sys/unseal", json={"share": shares[4]}).json()["sealed"] is False
