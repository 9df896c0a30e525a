"""The source address an XKS call is decided and audited under is its TCP peer, whatever headers it sends."""

from __future__ import annotations

import pytest

from tests.fixtures.keysteward import ServerProcess
from tests.support.xks_site import Xks, encrypt_body, error, site  # noqa: F401 - site is the fixture

pytestmark = pytest.mark.e2e


def test_a_forwarded_for_header_does_not_move_the_source_the_policy_sees(
    site: tuple[ServerProcess, str, Xks],  # noqa: F811 - the fixture imported above
) -> None:
    """The attacker is a process on the key manager's host (or anything that reaches it through a local
    relay) whose tenant policy only lets callers from 10.0.0.0/8 use the key. Its TCP peer is 127.0.0.1;
    it claims 10.9.9.9 with X-Forwarded-For (which SigV4 does not sign). The source the policy checks and
    the audit names is the TCP peer: refused."""
    server, admin, xks = site
    policy = """
@id("from-the-vpc-only")
permit (principal is Keysteward::CloudService, action, resource)
when { context.request has source_ip && context.request.source_ip.isInRange(ip("%s")) };
"""

    def spoofed(headers: dict[str, str], data: bytes) -> tuple[dict[str, str], bytes]:
        return {**headers, "X-Forwarded-For": "10.9.9.9", "Forwarded": "for=10.9.9.9"}, data

    with server.http(admin) as c:
        assert c.put("/policy", json={"sources": {"xks.cedar": policy % "10.0.0.0/8"}}).status_code == 200
    refused = xks.call("keys/k1/encrypt", encrypt_body(b"x" * 32), tamper=spoofed)
    assert error(refused) == (403, "AccessDeniedException"), refused.text
    with server.http(admin) as c:  # the same call is permitted from where it really comes from
        assert c.put("/policy", json={"sources": {"xks.cedar": policy % "127.0.0.0/8"}}).status_code == 200
    assert xks.call("keys/k1/encrypt", encrypt_body(b"x" * 32), tamper=spoofed).status_code == 200
