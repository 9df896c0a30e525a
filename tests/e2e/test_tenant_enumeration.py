"""Issue 11 item 9 against a real server process: tenant names cannot be learnt by probing.

The attacker knows no tenant, token or volume; it sends the same unauthenticated requests naming a tenant
that exists ("acme") and one that does not ("ghost"), and compares the answers: status, code and message
(the whole problem document but its instance path), and the time they take. Every unauthenticated route
that names a tenant is played: ``POST /v1/release`` (a garbage nonce, a genuine nonce with an unknown
volume, a genuine nonce with a bad one-time key), ``POST /v1/attest/tpm/enroll`` (a garbage nonce, a
genuine nonce with a forged identity document) and ``POST /v1/attest/tpm/activate``. Before the fix the
unknown tenant answered ``volume_not_found`` or "no tenant" where the known one said ``nonce_invalid`` or
named the enrollment.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keysteward.crypto.hpke import OneTimeKey
from keysteward.devcloud.provider import DevCloud
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import World
from tests.unit.test_tpm2_codec import AK_PUB

pytestmark = pytest.mark.e2e
TIMING_ROUNDS = 40


@pytest.fixture
def world(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> Iterator[World]:
    out = init_manager(tmp_path / "ks", secret_registry)
    # the attacker's refusals must not be cut short by the per-source limit while it compares answers
    server = server_factory(tmp_path / "ks", env={"KEYSTEWARD_RELEASE_REFUSALS_PER_SOURCE": "100000"})
    manager = ProcessManager(server, out.root_token.secret, secret_registry)
    yield World(manager, DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
    manager.client.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def answer(r: httpx.Response) -> tuple[int, dict[str, Any]]:
    body = r.json()
    body.pop("instance", None)  # the request's own path
    return r.status_code, body


def release_body(tenant: str, nonce: str, volume_id: str, public_key: bytes) -> dict[str, Any]:
    document = b64(json.dumps({"instanceId": "i-0", "accountId": "1", "imageId": "x"}).encode())
    return {
        "tenant": tenant,
        "volume_id": volume_id,
        "nonce": nonce,
        "public_key": b64(public_key),
        "evidence": {"identity": {"type": "aws-iid", "document": document, "signature": b64(b"\x00" * 64)}},
    }


def same_answer(world: World, path: str, body: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """POST ``body(tenant)`` for the known and the unknown tenant; both answers must be the same."""
    client = world.m.client
    known = answer(client.post(path, json=body("acme")))
    unknown = answer(client.post(path, json=body("ghost")))
    assert known == unknown, (known, unknown)
    assert known[0] in (400, 403, 404), known
    return known[1]


def test_an_unknown_tenant_answers_as_a_known_one(world: World) -> None:
    key = OneTimeKey.generate().public_bytes
    volume_id = str(uuid.uuid4())
    # release: a garbage nonce, then genuine nonces with an unknown volume and with a bad one-time key
    got = same_answer(world, "/v1/release", lambda t: release_body(t, "garbage", volume_id, key))
    assert got["code"] == "nonce_invalid"
    got = same_answer(world, "/v1/release", lambda t: release_body(t, world.challenge(), volume_id, key))
    assert got["code"] == "volume_not_found"
    got = same_answer(world, "/v1/release", lambda t: release_body(t, world.challenge(), volume_id, b"\x01" * 7))
    assert got["code"] == "hpke_invalid"
    # a volume id that is no uuid, the same
    got = same_answer(world, "/v1/release", lambda t: release_body(t, world.challenge(), "x" * 64, key))
    assert got["code"] == "volume_not_found"

    # TPM enrollment: a garbage nonce, then a genuine one with a forged document (acme trusts devcloud)
    def enroll(tenant: str, nonce: str) -> dict[str, Any]:
        document = b64(json.dumps({"instanceId": "i-0", "accountId": "111122223333"}).encode())
        return {
            "tenant": tenant,
            "nonce": nonce,
            "identity": {"type": "aws-iid", "document": document, "signature": b64(b"\x00" * 256)},
            "ek_public": b64(b"\x00" * 8),
            "ak_public": b64(AK_PUB),
        }

    got = same_answer(world, "/v1/attest/tpm/enroll", lambda t: enroll(t, "garbage"))
    assert got["code"] == "nonce_invalid"
    got = same_answer(world, "/v1/attest/tpm/enroll", lambda t: enroll(t, world.challenge()))
    assert got["code"] == "evidence_invalid"
    # ... also for a document of a kind acme trusts no provider of
    gcp = {"type": "gcp-jwt", "token": "a.b.c"}
    got = same_answer(world, "/v1/attest/tpm/enroll", lambda t: dict(enroll(t, world.challenge()), identity=gcp))
    assert got["code"] == "evidence_invalid"
    # activation of an enrollment nobody started
    enrollment = str(uuid.uuid4())
    body = {"enrollment_id": enrollment, "secret": b64(b"\x00" * 32)}
    got = same_answer(world, "/v1/attest/tpm/activate", lambda t: dict(body, tenant=t))
    assert got["code"] == "tpm_enrollment_not_found"


def test_an_unknown_tenant_takes_as_long_as_a_known_one(world: World) -> None:
    """Medians of interleaved requests with a genuine nonce and an unknown volume (before the fix the known
    tenant wrote an audit record, the unknown one nothing: a whole fsync apart)."""
    key = OneTimeKey.generate().public_bytes
    volume_id = str(uuid.uuid4())
    client = world.m.client
    times: dict[str, list[float]] = {"acme": [], "ghost": []}
    for _ in range(TIMING_ROUNDS):
        for tenant in ("acme", "ghost"):
            body = release_body(tenant, world.challenge(), volume_id, key)
            start = time.perf_counter()
            r = client.post("/v1/release", json=body)
            times[tenant].append(time.perf_counter() - start)
            assert r.json()["code"] == "volume_not_found"
    known, unknown = statistics.median(times["acme"]), statistics.median(times["ghost"])
    assert abs(known - unknown) <= 0.25 * max(known, unknown) + 0.0005, (known, unknown)
