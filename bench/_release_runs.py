"""The timed release runs of bench/release.py: the wrk Lua script in which each thread alternates a challenge
and a release with its next unused pre-made body, one measured run of it, and the audit check after the runs.

Not a bench itself: bench/release.py is, and ends with its ``{"bench": "release", "figures": [...]}`` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from _common import BenchError, PgCluster, WrkMeasurement, lua_string, measure_wrk
from _release import BodyStats, World, make_bodies

from keysteward.devcloud.provider import Instance

CONNECTIONS = 32
THREADS = 2
MARKER = "KSBENCH"


# -- the wrk script ----------------------------------------------------------------------------


def release_script(path: Path, bodies: Path, threads: int) -> Path:
    """The wrk Lua script: each thread alternates a challenge and a release with its next unused body."""
    path.write_text(
        f"""
local bodies_file = {lua_string(str(bodies))}
local nthreads = {threads}
local threads = {{}}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  bodies = {{}}
  local i = 0
  for line in io.lines(bodies_file) do
    if i % nthreads == id then bodies[#bodies + 1] = line end
    i = i + 1
  end
  local headers = {{["Content-Type"] = "application/json"}}
  challenge = wrk.format("POST", "/v1/release/challenge", headers, "{{}}")
  release_headers = headers
  used, released, exhausted, turn = 0, 0, 0, 0
  failures = {{}}
end

function request()
  turn = 1 - turn
  if turn == 1 then return challenge end
  local body = bodies[used + 1]
  if body == nil then
    exhausted = 1
    return challenge
  end
  used = used + 1
  return wrk.format("POST", "/v1/release", release_headers, body)
end

function response(status, headers, body)
  if status == 200 and string.find(body, '"sealed"', 1, true) then released = released + 1 end
  if status >= 300 and #failures < 3 then failures[#failures + 1] = status .. " " .. string.sub(body, 1, 400) end
end

function done(summary, latency, requests)
  local u, r, x, n = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    u = u + t:get("used")
    r = r + t:get("released")
    x = x + t:get("exhausted")
    n = n + #t:get("bodies")
  end
  io.write(string.format("{MARKER} bodies=%d used=%d released=%d exhausted=%d\\n", n, u, r, x))
  for _, t in ipairs(threads) do
    for _, f in ipairs(t:get("failures")) do io.write("answer: " .. f .. "\\n") end
  end
end
"""
    )
    return path


@dataclass
class ReleaseRun:
    m: WrkMeasurement
    bodies: int
    used: int
    released: int
    exhausted: bool

    @property
    def per_s(self) -> float:
        return self.released / self.m.wrk.seconds


def run_releases(
    world: World,
    pg: PgCluster | None,
    instances: list[Instance],
    volume_ids: list[str],
    count: int,
    seconds: float,
    work: Path,
    name: str,
    tpm_ports: list[int],
) -> tuple[ReleaseRun, BodyStats]:
    bodies = work / f"{name}.jsonl"
    made = make_bodies(world, instances, volume_ids, count, bodies, tpm_ports)
    script = release_script(work / f"{name}.lua", bodies, THREADS)
    m = measure_wrk(
        world.server,
        pg,
        "release",
        world.server.url + "/v1/release",
        script,
        seconds,
        warmup=0,
        connections=CONNECTIONS,
        threads=THREADS,
    )
    line = next((x for x in m.wrk.text.splitlines() if x.startswith(MARKER)), None)
    if line is None:
        raise BenchError(f"the wrk script printed no {MARKER} line:\n{m.wrk.text}")
    got = dict(part.split("=") for part in line.split()[1:])
    bodies.unlink()
    run = ReleaseRun(m, int(got["bodies"]), int(got["used"]), int(got["released"]), got["exhausted"] != "0")
    if run.bodies != count:
        raise BenchError(f"wrk threads loaded {run.bodies} bodies, not the {count} made")
    return run, made


def made_line(count: int, made: BodyStats, tpms: int) -> str:
    """How long the bodies took, and their quotes (summed over the workers) when there are any."""
    text = f"{count} bodies made in {made.seconds:.1f} s"
    if made.quotes:
        text += (
            f"; their {made.quotes} TPM quotes took {made.quote_seconds:.1f} s of TPM2_Quote on {tpms} swtpm "
            f"({1000 * made.quote_seconds / made.quotes:.2f} ms/quote)"
        )
    return text


def check_audit(world: World, seq0: int, low: int, high: int, ak_of: dict[str, str] | None) -> int:
    """The audit log after ``seq0``: ``low``-``high`` released volume.release records and no denial; with
    ``ak_of`` (instance id -> AK name), each names in ``details.platform.tpm_ak`` the AK of its instance's TPM."""
    released = denied = other = wrong_ak = 0
    for _, rec in world.admin.audit(seq0):
        if rec.get("action") != "volume.release":
            continue
        details = rec.get("details", {})
        if rec.get("outcome") == "denied":
            denied += 1
        elif details.get("decision") == "released":
            released += 1
            instance = details.get("instance", {}).get("instance_id")
            if ak_of is not None and details.get("platform", {}).get("tpm_ak") != ak_of.get(instance):
                wrong_ak += 1
        else:
            other += 1
    if denied or other or wrong_ak or not low <= released <= high:
        raise BenchError(
            f"audit log: {released} released ({wrong_ak} without their instance's TPM AK), {denied} denied, {other} "
            f"other volume.release records; wrk saw {low} released answers and sent {high} release requests"
        )
    return released
