"""Policy decisions per second: a realistic 200-policy tenant set against an empty set, same run, one thread.

    python bench/policy.py [--quick] [--rounds N]

It ends, as every bench does, with one line ``{"bench": "policy", "figures": [...]}``.

Work: 1,000 distinct release requests (200 instances over 50 accounts and 20 images, 1,000 volumes with
team / pci / sensitivity labels, SEV-SNP, TPM and plain platforms, times over the whole week), built
once as :class:`~keysteward.policy.facts.PolicyRequest` objects, decided in turn by
``CompiledPolicySet.evaluate`` on one thread.

* ``decisions_per_s_200_policies``: the 200-policy set; reference = the empty set (every request
  denied for want of a permit), which measures the fixed cost of a decision (entities, context,
  the call into Cedar); target: ratio >= 0.5.
* ``decisions_per_s_vs_5000``: the same value against a fixed reference of 5,000 decisions/s;
  target: ratio >= 1.
* ``evaluate_many_per_s``: the 200-policy set through ``evaluate_many`` in batches of 64 (context only).
* ``request_builds_per_s``: building and checking a PolicyRequest from its parts (context only: the
  release path pays it once per request, before evaluating).

The set (200 policies): 60 account + image allow-lists, 40 team-label forbids, 30 SNP measurement
permits, 30 TPM PCR 7 permits, 20 approval-gated permits for pci volumes, 10 business-hours and
source-address forbids, 10 admin-action policies for security officers. Each figure is the best of
many short interleaved rounds (each pass over the 1,000 requests is one sample; the machine is shared,
so the best sample of each is the one least disturbed). The last line is the machine-readable result.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from _common import ratio_figure, report_figures, say

from keysteward.policy.engine import CompiledPolicySet
from keysteward.policy.facts import PolicyRequest

BENCH = "policy"
TARGET_RATIO = 0.5
TARGET_RATE = 5000.0
ACCOUNTS = [f"{100000000000 + n}" for n in range(50)]
IMAGES = [f"ami-{n:08x}" for n in range(20)]
TEAMS = [f"team-{n}" for n in range(40)]
RELEASE = 'action == Keysteward::Action::"release"'


def _hex(seed: str, size: int = 48) -> str:
    return hashlib.sha384(seed.encode()).hexdigest()[: size * 2]


def policy_set() -> dict[str, str]:
    """Two hundred policies in five files, the way a tenant with many teams would write them."""
    allow = []
    for n in range(60):
        images = ", ".join(f'"{IMAGES[(n + k) % len(IMAGES)]}"' for k in range(3))
        allow.append(
            f'@id("allow-{n}")\npermit(principal is Keysteward::Instance, {RELEASE}, resource)\n'
            f'when {{ principal.account == "{ACCOUNTS[n % len(ACCOUNTS)]}" && principal has image_id &&\n'
            f"       [{images}].contains(principal.image_id) }};\n"
        )
    teams = [
        f'@id("team-{n}")\nforbid(principal is Keysteward::Instance, {RELEASE}, resource)\n'
        f'when {{ resource.hasTag("team") && resource.getTag("team") == "{TEAMS[n]}" &&\n'
        f'       principal.account != "{ACCOUNTS[n]}" }};\n'
        for n in range(40)
    ]
    platform = []
    for n in range(30):
        platform.append(
            f'@id("snp-{n}")\npermit(principal, {RELEASE}, resource)\n'
            f'when {{ context.platform.tee == "sev-snp" && context.platform has debug && !context.platform.debug &&\n'
            f'       context.platform has measurement && context.platform.measurement == "{_hex(f"m{n}")}" &&\n'
            f'       resource.sensitivity == "high" }};\n'
        )
        platform.append(
            f'@id("pcr-{n}")\npermit(principal is Keysteward::Instance, {RELEASE}, resource)\n'
            f'when {{ context.platform.tee == "tpm2" && context.platform has pcrs.sha256_7 &&\n'
            f'       context.platform.pcrs.sha256_7 == "{_hex(f"p{n}", 32)}" &&\n'
            f'       principal.account == "{ACCOUNTS[n]}" }};\n'
        )
    approvals = [
        f'@id("pci-{n}") @approval_group("security-officer") @approval_quorum("2")\n'
        f"permit(principal is Keysteward::Instance, {RELEASE}, resource)\n"
        f'when {{ resource.hasTag("pci") && principal.account == "{ACCOUNTS[n]}" }};\n'
        for n in range(20)
    ]
    guards = [
        f'@id("hours-{n}")\nforbid(principal, {RELEASE}, resource)\n'
        f'when {{ resource.hasTag("office-{n}") && (context.request.weekday > 5 || context.request.hour < 8) }};\n'
        for n in range(5)
    ] + [
        f'@id("net-{n}")\nforbid(principal, {RELEASE}, resource)\n'
        f'when {{ context.request has source_ip && context.request.source_ip.isInRange(ip("10.{n}.0.0/16")) }};\n'
        for n in range(5)
    ]
    admin = [
        f'@id("admin-{n}")\npermit(principal in Keysteward::Group::"security-officer", '
        f'action in [Keysteward::Action::"volume_revoke", Keysteward::Action::"approve"], resource)\n'
        f'when {{ resource.hasTag("team") && resource.getTag("team") == "{TEAMS[n]}" }};\n'
        for n in range(10)
    ]
    return {
        "allow.cedar": "".join(allow),
        "teams.cedar": "".join(teams),
        "platform.cedar": "".join(platform),
        "approvals.cedar": "".join(approvals + guards),
        "admin.cedar": "".join(admin),
    }


def request_parts(rng: random.Random, n: int) -> dict[str, Any]:
    account = ACCOUNTS[n % len(ACCOUNTS)]
    instance = f"i-{n % 200:012x}"
    labels = {"team": TEAMS[(n % len(ACCOUNTS)) % len(TEAMS)]}  # accounts 40-49 use others' team volumes
    if n % 7 == 0:
        labels["pci"] = "true"
    if n % 3 == 0:
        labels["sensitivity"] = "high"
    tee = ("sev-snp", "tpm2", "none")[n % 3]
    platform: dict[str, Any] = {"tee": tee}
    if tee == "sev-snp":
        platform.update(debug=n % 11 == 0, measurement=_hex(f"m{n % 30}"), vmpl=0)
        platform["tcb"] = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    elif tee == "tpm2":
        platform.update(
            secure_boot=True, pcrs={f"sha256_{i}": _hex(f"p{n % 30}" if i == 7 else f"x{i}", 32) for i in range(8)}
        )
    return {
        "tenant": "acme",
        "action": "release",
        "principal": {
            "type": "Instance",
            "provider": "aws",
            "account": account,
            "instance_id": instance,
            "image_id": IMAGES[n % len(IMAGES)],
            "region": "eu-west-1",
            "tags": {"env": "prod" if n % 2 else "dev"},
        },
        "resource": {"id": f"00000000-0000-4000-8000-{n:012d}", "name": f"vol-{n}", "key": "k1", "labels": labels},
        "identity": {"provider": "aws", "kind": "aws-iid", "account": account, "instance_id": instance},
        "platform": platform,
        "time": datetime(2026, 11, 23, tzinfo=UTC) + timedelta(minutes=rng.randrange(7 * 24 * 60)),
        "source_ip": f"{rng.choice((10, 192, 203))}.{rng.randrange(8)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
    }


def rate(fn: Callable[[], int]) -> float:
    """Decisions per second of one call of ``fn`` (which returns how many it made)."""
    started = time.perf_counter()
    done = fn()
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (finishes in well under 60 s)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved measuring rounds")
    args = parser.parse_args()
    rounds = args.rounds or (30 if args.quick else 150)
    rng = random.Random(5)

    started = time.monotonic()
    sources = policy_set()
    compiled = CompiledPolicySet.compile(sources)
    say(
        f"compiled {len(compiled.ids)} policies ({sum(map(len, sources.values())):,} bytes) "
        f"in {time.monotonic() - started:.2f} s"
    )
    empty = CompiledPolicySet.compile({})
    parts = [request_parts(rng, n) for n in range(1000)]
    requests = [PolicyRequest(**p) for p in parts]
    effects: dict[str, int] = {}
    for decision in compiled.evaluate_many(requests):
        effects[f"{decision.effect}/{decision.reason}"] = effects.get(f"{decision.effect}/{decision.reason}", 0) + 1
    say("outcomes over the 1,000 requests: " + ", ".join(f"{k} {v}" for k, v in sorted(effects.items())))
    considered = sum(len(compiled.candidates(r)) for r in requests) / len(requests)
    release_policies = sum(1 for policy_id in compiled.ids if not policy_id.startswith("admin-"))
    say(f"policies Cedar evaluates per request: {considered:.1f} on average, of {release_policies} for release")
    assert [compiled.evaluate(r) for r in requests] == compiled.evaluate_many(requests)

    def loop(engine: CompiledPolicySet) -> Callable[[], int]:
        def run() -> int:
            for request in requests:
                engine.evaluate(request)
            return len(requests)

        return run

    def batches() -> int:
        for start in range(0, len(requests), 64):
            compiled.evaluate_many(requests[start : start + 64])
        return len(requests)

    def builds() -> int:
        for p in parts[:200]:
            PolicyRequest(**p)
        return 200

    best = {"full": 0.0, "empty": 0.0, "many": 0.0, "build": 0.0}
    for _ in range(rounds):
        best["empty"] = max(best["empty"], rate(loop(empty)))
        best["full"] = max(best["full"], rate(loop(compiled)))
        best["many"] = max(best["many"], rate(batches))
        best["build"] = max(best["build"], rate(builds))
    say(f"empty set: {best['empty']:,.0f} decisions/s; 200 policies: {best['full']:,.0f} decisions/s")
    figures = [
        ratio_figure("decisions_per_s_200_policies", best["full"], "1/s", best["empty"], TARGET_RATIO),
        ratio_figure("decisions_per_s_vs_5000", best["full"], "1/s", TARGET_RATE, 1.0),
        ratio_figure("evaluate_many_per_s", best["many"], "1/s", best["full"], None),
        ratio_figure("request_builds_per_s", best["build"], "1/s", best["full"], None),
    ]
    report_figures(BENCH, figures, started, widths=(30, 4))


if __name__ == "__main__":
    main()
