"""Issue 11 item 7 against a real server process: nobody can flood a tenant's audit chain anonymously.

The attack, before the fix: 600 garbage ``POST /v1/release`` naming tenant "acme" wrote 600 signed denial
records into acme's chain, each with the attacker's text as its target, and anonymous unseal calls wrote
one system record each. Now a source is limited after ``refusals_per_source`` refusals (429), every
refusal of an unproven caller is counted into one ``anonymous`` record per interval per tenant, action and
reason, what the attacker named appears only escaped and cut in ``details.sample``, a genuine release from
another address during the flood goes through and keeps its own record (``audit list --outcome ok`` finds
it), and denials of authenticated callers keep one record each.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keysteward.crypto.hpke import OneTimeKey
from keysteward.devcloud.provider import DevCloud
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import World, wait_for

pytestmark = pytest.mark.e2e
LIMIT = 40
FLOOD = 600
# attacker-chosen text: a right-to-left override, a terminal escape, a newline, quotes, and length
EVIL = '\u202e"}\n\x1b[31mroot ok' + "\u00e9" * 60


def attacker(server: ServerProcess) -> httpx.Client:
    """An HTTPS client whose connections come from 127.0.0.2 (the tenant's instances use 127.0.0.1)."""
    ctx = ssl.create_default_context(cafile=server.settings.server.tls_ca)
    transport = httpx.HTTPTransport(verify=ctx, local_address="127.0.0.2")
    return httpx.Client(base_url=server.url + "/v1", transport=transport, timeout=30)


@pytest.fixture
def world(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> Iterator[World]:
    out = init_manager(tmp_path / "ks", secret_registry)
    env = {"KEYSTEWARD_RELEASE_REFUSALS_PER_SOURCE": str(LIMIT), "KEYSTEWARD_AUDIT_REFUSAL_INTERVAL": "1"}
    server = server_factory(tmp_path / "ks", env=env)
    manager = ProcessManager(server, out.root_token.secret, secret_registry)
    yield World(manager, DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
    manager.client.close()


def garbage(volume_id: str = EVIL) -> dict[str, Any]:
    key = OneTimeKey.generate().public_bytes.hex()
    return {
        "tenant": "acme",
        "volume_id": volume_id[:64],
        "nonce": "AAAA",
        "public_key": "AAAA" + key[:8],
        "evidence": {"identity": {"type": "aws-iid", "document": "x", "signature": "y"}},
    }


def counted(records: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [r for r in records if r["actor"] == "anonymous" and r["action"] == action]


def test_a_release_flood_is_limited_and_counted_and_real_events_stay_in_view(world: World) -> None:
    server: ServerProcess = world.m.server  # type: ignore[attr-defined]
    vm = world.cloud.create(account="111122223333", image_id="img-base")
    volume_id, _ = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    before = len(world.audit())
    statuses: list[int] = []
    with attacker(server) as flood:
        for i in range(FLOOD):
            r = flood.post("/release", json=garbage())
            statuses.append(r.status_code)
            if i == FLOOD // 2:  # a genuine instance from its own address, mid-flood
                released, _ = world.release(vm, volume_id)
                assert released.status_code == 200, released.text
        limited = flood.post("/release", json=garbage())
        assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"
        assert 0 < int(limited.headers["retry-after"]) <= 60
    assert statuses[:LIMIT] == [403] * LIMIT and set(statuses[LIMIT:]) == {429}, statuses[: LIMIT + 3]

    def records() -> list[dict[str, Any]]:
        return world.audit()[before:]

    wait_for(lambda: sum(r["details"]["count"] for r in counted(records(), "volume.release")) == FLOOD + 1)
    new = records()
    flood_records = counted(new, "volume.release")
    # a handful of records, not one per request
    assert len(flood_records) <= 12, len(flood_records)
    by_reason: dict[str, int] = {}
    for r in flood_records:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + r["details"]["count"]
        assert r["outcome"] == "denied" and r["target"] == "volume:*" and r["details"]["sources"] == ["127.0.0.2"]
        # the attacker's text only escaped and cut: printable ASCII, at most 128 characters
        sample = r["details"]["sample"]
        assert len(sample) <= 128 and sample.isascii() and sample.isprintable(), sample
        assert "\\u202e" in sample and "\\x1b" in sample
    assert by_reason == {"nonce_invalid": LIMIT, "rate_limited": FLOOD + 1 - LIMIT}, by_reason
    for r in new:
        text = json.dumps(r, ensure_ascii=False)
        assert "\u202e" not in text and "\x1b" not in text, r
    # the genuine release kept its own record, and audit list finds it among the counted ones
    released = [r for r in new if r["action"] == "volume.release" and r["outcome"] == "ok"]
    assert len(released) == 1 and released[0]["actor"] == f"instance:devcloud/111122223333/{vm.id}"
    ok = server.cli_json("audit", "list", "--outcome", "ok", "--last", "0", token=world.admin)
    assert [r["actor"] for r in ok if r["action"] == "volume.release"] == [released[0]["actor"]]
    anonymous = server.cli_json("audit", "list", "--actor", "anonymous", "--last", "0", token=world.admin)
    assert {r["action"] for r in anonymous} == {"volume.release"} and len(anonymous) == len(flood_records)


def test_authenticated_denials_keep_one_record_each(world: World) -> None:
    auditor = world.call("POST", "/v1/tokens", json={"name": "aud", "role": "auditor"}).json()["token"]
    for _ in range(3):
        r = world.m.call(auditor, "POST", "/v1/keys", json={"name": "nope"})
        assert r.status_code == 403, r.text
    denied = [r for r in world.audit() if r["actor"] == "token:acme/auditor/aud" and r["outcome"] == "denied"]
    assert len(denied) == 3


def test_anonymous_unseal_calls_are_counted_in_the_system_chain(world: World) -> None:
    server: ServerProcess = world.m.server  # type: ignore[attr-defined]
    root = world.m.root_token  # type: ignore[attr-defined]
    with server.http(root) as admin:
        before = len(admin.get("/audit", params={"limit": 1000}).json()["records"])
    with attacker(server) as flood:
        for _ in range(30):  # a dev-sealed server takes no shares: each call refused
            r = flood.post("/sys/unseal", json={"share": "kss1-" + "0" * 40})
            assert r.status_code in (409, 429), r.text

    def system() -> list[dict[str, Any]]:
        with server.http(root) as admin:
            records = admin.get("/audit", params={"limit": 1000}).json()["records"]
        return [json.loads(r["body"]) for r in records[before:]]

    wait_for(lambda: sum(r["details"]["count"] for r in counted(system(), "seal.unseal_share")) == 30)
    records = system()
    assert len(records) <= 6 and all(r["actor"] == "anonymous" for r in records), records


def test_counts_pending_at_shutdown_are_written(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks", env={"KEYSTEWARD_AUDIT_REFUSAL_INTERVAL": "3600"})
    manager = ProcessManager(server, out.root_token.secret, secret_registry)
    admin = World(manager, DevCloud.init(tmp_path / "devcloud")).admin  # type: ignore[arg-type]
    manager.client.close()
    with attacker(server) as flood:
        for _ in range(5):
            assert flood.post("/release", json=garbage("v")).status_code == 403
    assert not [r for r in server.cli_json("audit", "list", "--last", "0", token=admin) if r["actor"] == "anonymous"]
    server.stop()  # an interval away: the stop writes them
    server.start()
    records = [r for r in server.cli_json("audit", "list", "--last", "0", token=admin) if r["actor"] == "anonymous"]
    assert [(r["reason"], r["details"]["count"], r["details"]["sample"]) for r in records] == [
        ("nonce_invalid", 5, "v")
    ]
