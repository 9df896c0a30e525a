"""Issue 11 item 2 against a real server process: a destroyed key (version) ends the leases under it.

The attack: an instance holds a lease on a volume; the tenant crypto-shreds the key version (with
``force``) or the whole key. Before the fix the volume stayed ``active`` and the holder's renewals kept
answering ``continue``, so an agent that already had the volume open never learnt its key was gone. Now
every volume under the destroyed key or version is destroyed in the same transaction (its record beside
the key's), its holder's next renewal answers ``shred``, and volumes under other versions and keys go on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keysteward.devcloud.provider import DevCloud
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import World, denied

pytestmark = pytest.mark.e2e
ACCOUNT = "111122223333"


@pytest.fixture
def world(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> Iterator[World]:
    out = init_manager(tmp_path / "ks", secret_registry)
    # no rewrap job runs during the test: a volume's secret stays under the version it was made with
    server = server_factory(tmp_path / "ks", env={"KEYSTEWARD_REWRAP_POLL_SECONDS": "3600"})
    manager = ProcessManager(server, out.root_token.secret, secret_registry)
    yield World(manager, DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
    manager.client.close()


def _volume_state(world: World, name: str) -> str:
    r = world.call("GET", f"/v1/volumes/{name}")
    assert r.status_code == 200, r.text
    return str(r.json()["state"])


def _volume(world: World, name: str, key: str) -> str:
    return world.volume(name, {"provider": "devcloud", "account": ACCOUNT}, key=key)[0]


def _records(world: World, action: str) -> list[dict[str, Any]]:
    return [r for r in world.audit() if r["action"] == action]


def test_destroying_a_key_version_or_key_shreds_its_volumes_and_their_leases(world: World) -> None:
    cloud = world.cloud
    vm1, vm2, vm3 = (cloud.create(account=ACCOUNT, image_id="img-base") for _ in range(3))
    old_id = _volume(world, "old", "volumes")  # its secret under version 1
    _, old_lease, old_token = world.released(vm1, old_id)
    assert world.renew(old_lease, old_token).json()["action"] == "continue"

    assert world.call("POST", "/v1/keys/volumes/rotate").status_code == 200
    new_id = _volume(world, "new", "volumes")  # under version 2
    _, new_lease, new_token = world.released(vm2, new_id)
    assert world.call("POST", "/v1/keys", json={"name": "elsewhere"}).status_code == 201
    other_id = _volume(world, "other", "elsewhere")
    _, other_lease, other_token = world.released(vm3, other_id)

    # version 1 still holds a volume's secret: refused without force, shredded with it
    refused = world.call("POST", "/v1/keys/volumes/versions/1/destroy", json={})
    assert refused.status_code == 409 and refused.json()["code"] == "version_in_use", refused.text
    assert _volume_state(world, "old") == "active"
    r = world.call("POST", "/v1/keys/volumes/versions/1/destroy", json={"force": True})
    assert r.status_code == 200, r.text

    assert _volume_state(world, "old") == "destroyed"
    assert world.renew(old_lease, old_token).json()["action"] == "shred"
    assert world.renew(old_lease, old_token).json()["action"] == "shred"  # and stays so
    denied(world.release(vm1, old_id)[0], "volume_destroyed")
    # the volume under version 2 and the one under another key go on
    assert _volume_state(world, "new") == "active"
    assert world.renew(new_lease, new_token).json()["action"] == "continue"
    assert world.renew(other_lease, other_token).json()["action"] == "continue"

    # the key's record and the volume's are one transaction: adjacent links, the same actor
    version_destroy = _records(world, "key.version.destroy")[-1]
    volume_destroys = _records(world, "volume.destroy")
    assert [(v["target"], v["details"]["reason"]) for v in volume_destroys] == [
        (f"volume:{old_id}", "key version 1 destroyed")
    ]
    assert version_destroy["details"]["volumes_destroyed"] == 1
    assert volume_destroys[0]["seq"] + 1 == version_destroy["seq"]
    assert volume_destroys[0]["actor"] == version_destroy["actor"]

    # the whole key: every volume still under it
    assert world.call("POST", "/v1/keys/volumes/destroy").status_code == 200
    assert _volume_state(world, "new") == "destroyed"
    assert world.renew(new_lease, new_token).json()["action"] == "shred"
    denied(world.release(vm2, new_id)[0], "volume_destroyed")
    assert _records(world, "key.destroy")[-1]["details"]["volumes_destroyed"] == 1  # "old" was destroyed before
    assert _volume_state(world, "other") == "active"
    assert world.renew(other_lease, other_token).json()["action"] == "continue"
    # a destroyed volume cannot be revoked back into a revocable state
    assert world.call("POST", "/v1/volumes/new/revoke", json={}).json()["code"] == "volume_destroyed"
