"""A denied release never unwraps the volume's key: the server process's memory is searched for it.

A real ``keysteward server start`` process holds two volumes of one tenant. The tenant's policy forbids
releasing one of them. The server is restarted (so nothing of their registration is left in it), a devcloud
instance bound to both asks for the forbidden volume again and again, and every readable mapping of the
server's processes is searched (``/proc/PID/mem``) for that volume's secret: it is not there. Releasing the
other volume goes all the way; after it the search, which does find the forbidden volume's id in the
requests the server parsed, still finds nothing of that volume's secret.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from keysteward.devcloud.provider import DevCloud
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import World, denied
from tests.support.daemons import memory_holds

pytestmark = pytest.mark.e2e

ACCOUNT = "111122223333"
BINDING = Path(__file__).parents[2] / "src/keysteward/policy/binding.cedar"
LOCKED = """
@id("locked-volume")
forbid (principal, action == Keysteward::Action::"release", resource is Keysteward::Volume)
when { resource.name == "locked" };
"""


def _processes(pid: int) -> list[int]:
    """``pid`` and its descendants (the server's worker processes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            todo.extend(int(child) for child in (task / "children").read_text().split())
    return found


def _holders(server: ServerProcess, needles: dict[str, bytes]) -> set[str]:
    assert server.proc is not None
    held: set[str] = set()
    for pid in _processes(server.proc.pid):
        held |= memory_holds(pid, needles)
    return held


def test_a_denied_release_leaves_no_key_in_the_server(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    manager = ProcessManager(server, out.root_token.secret, secret_registry)
    try:
        world = World(manager, DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
        vm = world.cloud.create(account=ACCOUNT, image_id="img-base")
        bound = {"provider": "devcloud", "account": ACCOUNT, "instance_id": vm.id}
        locked_id, locked = world.volume("locked", bound)
        open_id, opened = world.volume("open", bound)
        sources = {"binding.cedar": BINDING.read_text(), "locked.cedar": LOCKED}
        r = world.call("PUT", "/v1/policy", json={"sources": sources})
        assert r.status_code == 200, r.text
        needles = {"locked secret": locked, "locked secret (first half)": locked[:16], "(last half)": locked[16:]}

        server.stop()
        server.start()
        assert _holders(server, needles) == set()
        for _ in range(20):
            r, _otk = world.release(vm, locked_id)
            denied(r, "forbidden_by_policy")
        assert _holders(server, needles) == set(), "a denied release unwrapped the volume's key"

        # the control: a permitted release of the other volume goes all the way, and still nothing of the
        # forbidden volume's secret appears
        secret, _, _ = world.released(vm, open_id)
        assert secret == opened
        # the search reads the server's heap: the id every denied request carried is there, the secret is not
        control = {"locked volume id": locked_id.encode()}
        assert _holders(server, {**needles, **control}) == {"locked volume id"}
        outcomes = [(r["target"], r["outcome"]) for r in world.audit() if r["action"] == "volume.release"]
        assert outcomes.count((f"volume:{locked_id}", "denied")) == 20
        assert outcomes.count((f"volume:{open_id}", "ok")) == 1
    finally:
        manager.client.close()
