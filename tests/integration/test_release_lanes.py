"""The release protocol's lanes (server/release_lanes.py) answer as the routes they stand for.

The challenge: the same JSON, a nonce the release path accepts once, the headers and metrics of every
answer, and nothing while sealed. The release: the same answers as the route to the same requests, released
or refused; a body it does not take goes to the framework, which refuses it as before with nothing decided.
Every other request, and any other method on those paths, still goes through the framework."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keysteward.crypto import hpke
from keysteward.crypto.hpke import OneTimeKey
from keysteward.devcloud.provider import DevCloud
from keysteward.errors import Denied
from keysteward.formats.release_wire import PROTOCOL, seal_info
from keysteward.server import release_lanes
from keysteward.server.release_lanes import ChallengeLane, ReleaseLane
from keysteward.server.release_schemas import ChallengeOut, ReleasedOut
from keysteward.server.routers.release import release_answer
from tests.fixtures.keysteward import Manager
from tests.integration.test_release_api import World, b64, cloud, world

pytestmark = pytest.mark.integration
__all__ = ["cloud", "world"]


def _counted(m: Manager) -> dict[str, float]:
    """The request counts of the challenge route, by label (the route's template, as routing gives it)."""
    metrics = m.call(m.root_token, "GET", "/metrics").text
    found = re.findall(r'^keysteward_http_requests_total\{method="POST",route="([^"]*/release/challenge)",'
                       r'status="200"\} (\S+)$', metrics, re.MULTILINE)  # fmt: skip
    return {route: float(count) for route, count in found}


def test_the_lane_answers_the_challenge_as_its_route_describes(manager: Manager) -> None:
    m = manager
    assert any(layer.cls is ChallengeLane for layer in m.client.app.user_middleware)  # type: ignore[attr-defined]
    before = _counted(m)
    answers = [m.client.post("/v1/release/challenge", json={}) for _ in range(3)]
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
        out = ChallengeOut.model_validate_json(r.content)
        assert out.protocol == PROTOCOL and out.suites == list(hpke.SUITES)
        assert timedelta(0) < out.expires_at - datetime.now(UTC) <= timedelta(seconds=m.svc.nonces.ttl + 1)
        raw = base64.urlsafe_b64decode(out.nonce + "=" * (-len(out.nonce) % 4))
        assert m.svc.nonces.check(raw) == out.expires_at  # a nonce this key manager issued, unexpired
    assert len({r.json()["nonce"] for r in answers}) == 3  # fresh each time
    after = _counted(m)  # counted under the route's template, as routed requests are: one label, three more
    assert len(after) == 1 and sum(after.values()) == sum(before.values()) + 3, (before, after)

    forged = bytearray(base64.urlsafe_b64decode(answers[0].json()["nonce"] + "=="))
    forged[-1] ^= 1
    with pytest.raises(Denied):
        m.svc.nonces.check(bytes(forged))

    other_method = m.client.get("/v1/release/challenge")  # not the lane's: the framework answers as before
    assert other_method.status_code == 405
    schema = m.client.get("/v1/openapi.json").json()
    assert "/v1/release/challenge" in schema["paths"]  # the route still describes it


def test_a_sealed_server_gives_no_challenge(manager: Manager) -> None:
    m = manager
    assert m.call(m.root_token, "POST", "/v1/sys/seal").json()["sealed"] is True
    r = m.client.post("/v1/release/challenge", json={})
    assert r.status_code == 503 and r.json()["code"] == "sealed"
    assert r.headers["cache-control"] == "no-store"


def test_an_oversized_challenge_body_is_refused_before_the_lane(manager: Manager) -> None:
    m = manager
    limit = m.svc.settings.server.max_body_bytes
    r = m.client.post("/v1/release/challenge", content=b"x" * (limit + 1), headers={"content-type": "text/plain"})
    assert r.status_code == 413 and r.headers["cache-control"] == "no-store"


def _spied(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The volumes the release lane itself answered for (the route calls the same function by its own name)."""
    taken: list[str] = []

    async def spy(svc: Any, request: Any, body: Any) -> Any:
        taken.append(body.volume_id)
        return await release_answer(svc, request, body)

    monkeypatch.setattr(release_lanes, "release_answer", spy)
    return taken


def _release_body(world: World, vm: Any, vid: str, **over: Any) -> tuple[dict[str, Any], OneTimeKey]:
    otk = OneTimeKey.generate()
    nonce = world.challenge()
    body = {
        "tenant": "acme",
        "volume_id": vid,
        "nonce": nonce,
        "public_key": b64(otk.public_bytes),
        "evidence": {"identity": world.evidence(vm, nonce, otk.public_bytes)},
    }
    return {**body, **over}, otk


def _released_counts(m: Manager) -> dict[str, float]:
    metrics = m.call(m.root_token, "GET", "/metrics").text
    found = re.findall(r'^keysteward_http_requests_total\{method="POST",route="(/release)",status="(\d+)"\} (\S+)$',
                       metrics, re.MULTILINE)  # fmt: skip
    return {status: float(count) for _, status, count in found}


def test_the_release_lane_answers_as_the_route(world: World, cloud: DevCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request twice: as JSON (the lane's) and as another JSON media type FastAPI decodes too (the route's).
    The answers match: a release that opens, and each refusal with its code, decision and headers."""
    m = world.m
    assert any(layer.cls is ReleaseLane for layer in m.client.app.user_middleware)  # type: ignore[attr-defined]
    taken = _spied(monkeypatch)
    vm = cloud.create(account="111122223333", image_id="img-base")
    vid, secret = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    other_vid, _ = world.volume("other", {"provider": "devcloud", "account": "999999999999"})
    before = _released_counts(m)
    answers = {}
    for lane, content_type in ((True, "application/json"), (False, "application/vnd.keysteward+json")):
        headers = {"content-type": content_type}
        replayed_body, _ = _release_body(world, vm, vid)
        cases: dict[str, tuple[dict[str, Any], OneTimeKey | None]] = {
            "released": _release_body(world, vm, vid),
            "replayed": (replayed_body, None),
            "unbound": _release_body(world, vm, other_vid),
            "unknown volume": _release_body(world, vm, "00000000-0000-4000-8000-000000000000"),
            "bad key": (dict(_release_body(world, vm, vid)[0], public_key=b64(b"short")), None),
        }
        assert m.client.post("/v1/release", content=json.dumps(replayed_body), headers=headers).status_code == 200
        for name, (body, otk) in cases.items():
            r = m.client.post("/v1/release", content=json.dumps(body), headers=headers)
            assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
            answers[(lane, name)] = (r.status_code, r.headers["content-type"], r.json())
            if name == "released":
                assert r.status_code == 200, r.text
                out = ReleasedOut.model_validate_json(r.content)
                assert otk is not None
                plain = otk.open(base64.b64decode(out.sealed), seal_info("acme", vid, out.lease.id))
                assert bytes(plain[5 : 5 + plain[4]]) == secret
    for name in ("released", "replayed", "unbound", "unknown volume", "bad key"):
        (s1, t1, b1), (s2, t2, b2) = answers[(True, name)], answers[(False, name)]
        assert (s1, t1) == (s2, t2), (name, answers[(True, name)], answers[(False, name)])
        if name == "released":
            assert (
                b1.keys() == b2.keys()
                and b1["lease"].keys() == b2["lease"].keys()
                and b1["lease"]["id"] != b2["lease"]["id"]
            )
            assert {k: v for k, v in b1.items() if k not in ("sealed", "lease")} == {
                k: v for k, v in b2.items() if k not in ("sealed", "lease")
            }
        else:
            assert s1 in (400, 403, 404) and b1 == b2, (name, b1, b2)
    assert (
        answers[(True, "replayed")][2]["code"] == "nonce_replayed"
        and answers[(True, "replayed")][2]["decision"] == "denied"
    )
    assert len(taken) == 6 and taken.count(vid) == 4  # the lane answered each JSON request, none of the others
    after = _released_counts(m)  # all twelve under the route's template, as routing labels them
    assert sum(after.values()) - sum(before.values()) == 12 and after["200"] - before.get("200", 0) == 4


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"", "application/json"),
        (b"{", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"[]", "application/json"),
        (b'{"tenant": "acme"}', "application/json"),
        (b'{"tenant": "acme"}', "text/plain"),
        (
            b'{"tenant": "acme", "volume_id": "v", "nonce": "n", "public_key": "AA==", "suite": "rsa"}',
            "application/json",
        ),
    ],
)
def test_bodies_the_lane_does_not_take_are_refused_by_the_framework(
    world: World, monkeypatch: pytest.MonkeyPatch, content: bytes, content_type: str
) -> None:
    taken = _spied(monkeypatch)
    before = len(world.audit())
    r = world.m.client.post("/v1/release", content=content, headers={"content-type": content_type})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == "invalid_request"
    assert taken == [] and len(world.audit()) == before  # nothing decided, nothing recorded


def test_an_unforeseen_failure_in_the_lane_tells_the_client_nothing(
    world: World, cloud: DevCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = cloud.create(account="111122223333", image_id="img-base")
    vid, _ = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    body, _ = _release_body(world, vm, vid)

    async def broken(request: Any) -> Any:
        raise RuntimeError("secret-looking detail 0123456789abcdef")

    monkeypatch.setattr(world.m.svc.access, "decide_async", broken)
    r = world.m.client.post("/v1/release", json=body)
    assert r.status_code == 500 and r.json()["code"] == "internal_error"
    assert "0123456789abcdef" not in r.text and r.headers["cache-control"] == "no-store"


def test_a_sealed_server_releases_nothing_through_the_lane(world: World, cloud: DevCloud) -> None:
    m = world.m
    vm = cloud.create(account="111122223333", image_id="img-base")
    vid, _ = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    body, _ = _release_body(world, vm, vid)
    assert m.call(m.root_token, "POST", "/v1/sys/seal").json()["sealed"] is True
    r = m.client.post("/v1/release", json=body)
    assert r.status_code == 503 and r.json()["code"] == "sealed"


def test_a_client_gone_before_its_body_gets_no_answer_and_no_decision() -> None:
    inner: list[Any] = []
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        inner.append(scope)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    lane = ReleaseLane(app, svc=None, route=None)  # type: ignore[arg-type]
    scope = {
        "type": "http",
        "path": "/v1/release",
        "method": "POST",
        "headers": [(b"content-type", b"application/json")],
    }
    asyncio.run(lane(scope, receive, send))
    assert inner == [] and sent == []
