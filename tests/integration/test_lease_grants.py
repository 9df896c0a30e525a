"""Renewals of a lease whose grant the server remembers (no read before the transaction, no worker thread).

The grant (tenant, volume, holder, token hash, facts) never changes, so remembering it cannot outrun a
revocation: each renewal still reads the lease's state in the audit writer's transaction. Played here:
a revocation written by another server straight into the shared database, a volume revoked through the
API, and a wrong token or another lease's token on a remembered lease; on both engines.
"""

from __future__ import annotations

import pytest
from sqlalchemy import update

from keysteward.devcloud.provider import DevCloud
from keysteward.store.models import Lease
from tests.integration.test_release_api import World, cloud, world

pytestmark = pytest.mark.integration
__all__ = ["cloud", "world"]
BIND = {"provider": "devcloud", "account": "111122223333"}


def test_a_remembered_lease_still_ends_when_another_server_revokes_it(world: World, cloud: DevCloud) -> None:
    vm = cloud.create(account="111122223333", image_id="img-base")
    volume_id, _ = world.volume("data", BIND)
    _, lease_id, token = world.released(vm, volume_id)
    grants = world.m.svc.registry.grants
    assert grants.cached(lease_id) is None
    assert world.renew(lease_id, token).json()["action"] == "continue"
    assert grants.cached(lease_id) is not None  # the next renewals read nothing before the transaction
    assert world.renew(lease_id, token).json()["action"] == "continue"
    # another server of the same database revokes the lease: this one learns it at the next renewal
    with world.m.svc.db.write() as conn:
        conn.execute(update(Lease).where(Lease.id == lease_id).values(state="revoked"))
    assert world.renew(lease_id, token).json()["action"] == "revoked"
    assert world.renew(lease_id, token).json()["action"] == "revoked"


def test_a_remembered_lease_checks_its_token_and_its_volume_every_time(world: World, cloud: DevCloud) -> None:
    vm = cloud.create(account="111122223333", image_id="img-base")
    first, _ = world.volume("first", BIND)
    second, _ = world.volume("second", BIND)
    _, lease_id, token = world.released(vm, first)
    _, other_id, other_token = world.released(vm, second)
    for lease, secret in ((lease_id, token), (other_id, other_token)):
        assert world.renew(lease, secret).json()["action"] == "continue"
    for lease, secret in ((lease_id, other_token), (other_id, token), (lease_id, bytes(len(token)))):
        r = world.renew(lease, secret)
        assert r.status_code == 404 and r.json()["code"] == "lease_not_found", r.text
    assert world.call("POST", "/v1/volumes/first/revoke", json={"reason": "incident 9"}).status_code == 200
    assert world.renew(lease_id, token).json()["action"] == "revoked"
    assert world.renew(other_id, other_token).json()["action"] == "continue"
    ends = world.m.client.post(f"/v1/leases/{other_id}/end", json={"token": "AAAA"})
    assert ends.status_code == 404 and ends.json()["code"] == "lease_not_found"
    assert world.renew(other_id, other_token).json()["action"] == "continue"  # a refused end changed nothing
