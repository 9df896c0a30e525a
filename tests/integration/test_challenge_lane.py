"""The release challenge's own lane (server/challenge_lane.py) answers as the route it stands for: the same
JSON, a nonce the release path accepts once, the headers and metrics of every answer, and nothing while
sealed; every other request, and any other method on that path, still goes through the framework."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta

import pytest

from keysteward.crypto import hpke
from keysteward.errors import Denied
from keysteward.formats.release_wire import PROTOCOL
from keysteward.server.challenge_lane import ChallengeLane
from keysteward.server.release_schemas import ChallengeOut
from tests.fixtures.keysteward import Manager

pytestmark = pytest.mark.integration


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
