"""The simulated fleet of bench/leases.py: agents that release their volume once, then renew their lease in
their own slot of the period; one asyncio run of the whole fleet and the renewals it saw; and the checks after
it (each agent's lease as the server lists it, the audit log's suspected_clone alarms).

Not a bench itself: bench/leases.py is, and ends with its ``{"bench": "leases", "figures": [...]}`` line.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from _common import BenchError, say
from _release import HttpPool, World, b64, open_released, release_body

from keysteward.crypto.hpke import OneTimeKey
from keysteward.devcloud.provider import Instance

LEASE_SECONDS = 30
RENEW_SECONDS = 10
POOL = 64  # renewal connections
RELEASE_POOL = 8  # connections the fleet's releases share: the boot leaves room for the renewals


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Agent:
    index: int
    instance: Instance
    volume_id: str = ""
    lease_id: str = ""
    token: bytes = b""
    released_at: float = 0.0
    lost: str = ""  # the answer that ended its lease, if any


@dataclass
class Renewal:
    due: float  # loop time the renewal was due (the agent's slot)
    start: float  # loop time it started (before waiting for a free connection)
    took: float  # seconds to its answer
    action: str  # the answer's action, or "error"


@dataclass
class Stats:
    t_start: float = 0.0  # loop time the measured phase starts (every agent released)
    t_end: float = math.inf
    renewals: list[Renewal] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def window(self) -> list[Renewal]:
        return [r for r in self.renewals if self.t_start <= r.due < self.t_end]

    def before(self) -> list[Renewal]:
        return [r for r in self.renewals if r.due < self.t_start]


async def register_volumes(pool: HttpPool, world: World, agents: list[Agent]) -> None:
    otk = OneTimeKey.generate()  # the creating tool's key; the secrets are not needed here

    async def one(agent: Agent) -> None:
        body = world.volume_request(f"vol{agent.index:05d}", otk.public_bytes, LEASE_SECONDS, RENEW_SECONDS)
        status, answer = await pool.request("POST", "/v1/volumes", body)
        if status != 201:
            raise BenchError(f"POST /v1/volumes answered {status}: {answer}")
        agent.volume_id = str(answer["volume"]["id"])

    await asyncio.gather(*(one(a) for a in agents))


async def release(pool: HttpPool, world: World, agent: Agent) -> None:
    status, answer = await pool.request("POST", "/v1/release/challenge", {})
    if status != 200:
        raise BenchError(f"POST /v1/release/challenge answered {status}: {answer}")
    body, otk = release_body(world.cloud, agent.instance, agent.volume_id, answer["nonce"])
    status, answer = await pool.request("POST", "/v1/release", body)
    if status != 200:
        raise BenchError(f"agent {agent.index}: POST /v1/release answered {status}: {answer}")
    _, agent.lease_id, agent.token = open_released(answer, otk, agent.volume_id)
    if answer["lease"]["renew_seconds"] != RENEW_SECONDS or answer["lease"]["lease_seconds"] != LEASE_SECONDS:
        raise BenchError(f"unexpected lease terms {answer['lease']}")


async def agent_life(
    releases: HttpPool, renewals: HttpPool, world: World, agent: Agent, stats: Stats, t0: float, count: int
) -> None:
    """Release once, then renew in this agent's slot every period until the end (or until the lease is lost)."""
    loop = asyncio.get_running_loop()
    await release(releases, world, agent)
    agent.released_at = loop.time()
    slot = t0 + agent.index / count * RENEW_SECONDS
    due = slot + RENEW_SECONDS * max(0, math.ceil((agent.released_at - slot) / RENEW_SECONDS))  # next slot
    body = {"token": b64(agent.token)}
    path = f"/v1/leases/{agent.lease_id}/renew"
    while due < stats.t_end:
        await asyncio.sleep(max(0.0, due - loop.time()))
        if due >= stats.t_end:
            break
        start = loop.time()
        try:
            status, answer = await renewals.request("POST", path, body)
            action = str(answer["action"]) if status == 200 else "error"
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            status, answer, action = 0, repr(exc), "error"
        stats.renewals.append(Renewal(due, start, loop.time() - start, action))
        if action == "error" and len(stats.error_samples) < 5:
            stats.error_samples.append(f"agent {agent.index}: {status} {answer}")
        if action not in ("continue", "error"):
            agent.lost = f"{action} at +{start - agent.released_at:.1f} s after its release"
            return
        due += RENEW_SECONDS


async def run_fleet(
    world: World, agents: list[Agent], seconds: float, cpu: Callable[[], tuple[float, ...]]
) -> tuple[Stats, tuple[float, ...]]:
    """Register, release, renew; returns the stats and the CPU used during the measured phase (``cpu()`` deltas)."""
    server = world.server
    pool = HttpPool(server.url, server.ca_file, POOL, token=world.admin.token)
    releases = HttpPool(server.url, server.ca_file, RELEASE_POOL)  # the fleet's boot: apart from the renewals
    renewals = HttpPool(server.url, server.ca_file, POOL)
    loop = asyncio.get_running_loop()
    stats = Stats()
    try:
        started = loop.time()
        await register_volumes(pool, world, agents)
        registered = loop.time() - started
        say(f"  {len(agents)} volumes registered in {registered:.1f} s ({len(agents) / registered:,.0f}/s)")
        t0 = loop.time()
        tasks = [asyncio.create_task(agent_life(releases, renewals, world, a, stats, t0, len(agents))) for a in agents]
        while sum(1 for a in agents if a.lease_id) < len(agents):
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            await asyncio.sleep(0.05)
        release_phase = loop.time() - t0
        stats.t_start = loop.time()
        stats.t_end = stats.t_start + seconds
        cpu0 = cpu()
        say(
            f"  {len(agents)} agents released their volumes in {release_phase:.1f} s "
            f"({len(agents) / release_phase:,.0f} releases/s, renewing meanwhile); "
            f"measuring renewals for {seconds:g} s"
        )
        results = await asyncio.gather(*tasks, return_exceptions=True)
        used = tuple(b - a for a, b in zip(cpu0, cpu(), strict=True))
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return stats, used
    finally:
        for p in (pool, releases, renewals):
            await p.close()


async def check_leases(world: World, agents: list[Agent], ended: datetime) -> dict[int, str]:
    """Agents whose lease, as the server lists it, was not the one live lease of its volume when the run
    ``ended``: the renewals stop then, and a listing some seconds later may find a kept lease run out since
    (state ``expired``, expiry after ``ended``), which is not a lost one.

    ``GET /v1/leases`` lists at most 1,000 leases, so each volume's leases are asked for on their own.
    """
    pool = HttpPool(world.server.url, world.server.ca_file, POOL, token=world.admin.token)
    problems: dict[int, str] = {}

    async def one(agent: Agent) -> None:
        status, listed = await pool.request("GET", f"/v1/leases?volume={agent.volume_id}")
        if status != 200:
            raise BenchError(f"GET /v1/leases?volume={agent.volume_id} answered {status}: {listed}")
        live = [x for x in listed if x["state"] in ("active", "expired") and _utc(x["expires_at"]) > ended]
        mine = [x for x in live if x["id"] == agent.lease_id]
        if len(live) != 1 or not mine:
            problems[agent.index] = f"leases live at the end {live} (listed: {[x['state'] for x in listed]})"

    try:
        await asyncio.gather(*(one(a) for a in agents))
    finally:
        await pool.close()
    return problems


def _utc(text: str) -> datetime:
    """An RFC 3339 time from the API; on SQLite the lease listing gives UTC times without an offset."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def clone_alarms(world: World, after: int) -> list[dict[str, Any]]:
    return [
        rec
        for _, rec in world.admin.audit(after)
        if rec.get("reason") == "suspected_clone" or rec.get("details", {}).get("alert") == "suspected_clone"
    ]
