"""The access path leaves no reference cycle behind: what a decision made is freed when its answer is sent.

A step that held its effect, and an effect that held its step, were a cycle per request that only Python's
cyclic collector could free: under load, a collection of the young generation every second or so, 5-10 ms
with the event loop stopped, and about 100 ms for a full one. Requests are made here through the real API
(in-process), with the collector saving what it finds instead of freeing it, and nothing of keysteward's may
be among it.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keysteward.devcloud.provider import DevCloud
from tests.fixtures.keysteward import Manager
from tests.integration.test_release_api import World, denied

pytestmark = pytest.mark.integration


def _cyclic_garbage(work: Callable[[], None]) -> Counter[str]:
    """keysteward's objects among what only the cyclic collector would have freed while ``work`` ran."""
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.garbage.clear()
        work()
        gc.collect()
        found = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
    return Counter({name: n for name, n in found.items() if name.startswith("keysteward.")})


@pytest.fixture
def keyed(manager: Manager) -> Iterator[tuple[Manager, str, str]]:
    admin = manager.tenant("acme")
    assert manager.call(admin, "POST", "/v1/keys", json={"name": "orders"}).status_code == 201
    enc = manager.call(admin, "POST", "/v1/keys/orders/encrypt", json={"plaintext": "aGVsbG8=", "context": {"a": "b"}})
    assert enc.status_code == 200, enc.text
    yield manager, admin, enc.json()["ciphertext"]


def test_envelope_operations_leave_no_cycle(keyed: tuple[Manager, str, str]) -> None:
    manager, admin, ciphertext = keyed

    def work() -> None:
        for _ in range(20):
            dec = manager.call(admin, "POST", "/v1/decrypt", json={"ciphertext": ciphertext, "context": {"a": "b"}})
            assert dec.status_code == 200 and dec.json()["plaintext"] == "aGVsbG8="
            enc = manager.call(admin, "POST", "/v1/keys/orders/encrypt", json={"plaintext": "aGk=", "context": {}})
            assert enc.status_code == 200

    work()  # caches filled, policies compiled: what stays is not garbage
    assert _cyclic_garbage(work) == Counter()


def test_refusals_leave_no_cycle(keyed: tuple[Manager, str, str]) -> None:
    manager, admin, ciphertext = keyed
    reader = manager.call(admin, "POST", "/v1/tokens", json={"name": "audrey", "role": "auditor"})
    assert reader.status_code == 201, reader.text
    token = reader.json()["token"]

    def work() -> None:
        for _ in range(10):
            bad = manager.call(admin, "POST", "/v1/decrypt", json={"ciphertext": ciphertext, "context": {"a": "c"}})
            assert bad.status_code == 400 and bad.json()["code"] == "invalid_ciphertext"
            denied = manager.call(token, "POST", "/v1/decrypt", json={"ciphertext": ciphertext, "context": {"a": "b"}})
            assert denied.status_code == 403, denied.text
            gone = manager.call(admin, "POST", "/v1/keys/nosuch/encrypt", json={"plaintext": "aGk=", "context": {}})
            assert gone.status_code == 404

    work()
    assert _cyclic_garbage(work) == Counter()


def test_releases_renewals_and_denied_releases_leave_no_cycle(manager: Manager, tmp_path: Path) -> None:
    cloud = DevCloud.init(tmp_path / "devcloud")
    world = World(manager, cloud)
    vm = cloud.create(account="111122223333", image_id="img-base")
    stranger = cloud.create(account="999988887777", image_id="img-base")
    volume_id, secret = world.volume("data", {"provider": "devcloud", "account": "111122223333"})

    def work() -> None:
        for _ in range(5):
            got, lease_id, token = world.released(vm, volume_id)
            assert got == secret
            assert world.renew(lease_id, token).json()["action"] == "continue"
            nonce = world.challenge()
            assert world.release(vm, volume_id, nonce=nonce)[0].status_code == 200
            denied(world.release(vm, volume_id, nonce=nonce)[0], "nonce_replayed")
            denied(world.release(stranger, volume_id)[0], "not_bound")  # another account

    work()
    assert _cyclic_garbage(work) == Counter()
