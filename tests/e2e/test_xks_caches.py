"""What an XKS call keeps in memory (the store, the SigV4 secret, the key link, the unwrapped key version,
the call's facts and the policy's decision) never outruns a change: on a server whose caches are warm from
a stream of identical calls, the very next call after a policy change, a key disable or a credential
retirement is refused, and every call, refused or permitted, has its audit record."""

from __future__ import annotations

from collections import Counter

from tests.fixtures.keysteward import ServerProcess
from tests.support.xks_site import POLICY, Xks, encrypt_body, error, put_policy, site  # noqa: F401 - the fixture

FORBID_GENERATE = """
@id("no-generate-data-key")
forbid (principal is Keysteward::CloudService, action == Keysteward::Action::"encrypt", resource)
when { context has kms && context.kms.operation == "GenerateDataKey" };
"""


def test_warm_caches_never_outrun_a_policy_change_a_disabled_key_or_a_retired_credential(
    site: tuple[ServerProcess, str, Xks],  # noqa: F811 - the fixture imported above
) -> None:
    server, admin, xks = site
    put_policy(server, admin)
    body = encrypt_body(b"p" * 32)  # one kmsRequestId sent again and again, as bench/xks.py does
    request_id = body["requestMetadata"]["kmsRequestId"]
    sent = 0

    def call(**credential: str) -> tuple[int, str]:
        nonlocal sent
        sent += 1
        r = xks.call("keys/k1/encrypt", body, **credential)
        return (r.status_code, "ok") if r.status_code == 200 else error(r)

    def warm() -> None:  # within the caches' one second, right before the change
        assert [call() for _ in range(3)] == [(200, "ok")] * 3

    # the changes go through the REST API on a client already connected: each lands well within a second
    with server.http(admin) as c:
        assert [call() for _ in range(20)] == [(200, "ok")] * 20
        assert c.put("/policy", json={"sources": {"xks.cedar": POLICY + FORBID_GENERATE}}).status_code == 200
        assert call() == (403, "AccessDeniedException")
        assert c.put("/policy", json={"sources": {"xks.cedar": POLICY}}).status_code == 200
        warm()

        assert c.post("/xks/keys/k1/disable", json={"store": "acme/ebs"}).status_code == 200
        assert call() == (400, "InvalidStateException")
        assert c.post("/xks/keys/k1/enable", json={"store": "acme/ebs"}).status_code == 200
        second = c.post("/xks/credentials", json={"store": "acme/ebs"}).json()
        warm()

        assert c.post(f"/xks/credentials/{xks.akid}/retire").status_code == 200
        assert call() == (401, "AuthenticationFailedException")
        assert call(akid=second["access_key_id"], secret=second["secret_access_key"]) == (200, "ok")

    # every call that proved its credential has its own record (the 401 is counted as a refusal instead)
    records = server.cli_json("audit", "list", "--kms-request-id", request_id, "--last", "0", token=admin)
    assert len(records) == sent - 1
    outcomes = Counter((r["outcome"], r.get("reason") or "") for r in records)
    assert outcomes[("denied", "forbidden_by_policy")] == 1 and outcomes[("error", "key_disabled")] == 1
    assert sum(n for (outcome, _), n in outcomes.items() if outcome == "ok") == sent - 3
