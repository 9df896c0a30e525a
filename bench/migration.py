"""Live migration (issue 17): total time and downtime through keysteward against plain QEMU TLS migration.

    python bench/migration.py [--quick] [--rounds N] [--fill-mb N] [--memory-mb N]

One real server process, two real ``keysteward host run`` processes (``host-a`` and ``host-b``, each with
its host certificate, state directory and NBD sockets, TCG, no TPM) and one VM of ``--memory-mb`` MiB
(1536; ``--quick`` 512) whose guest touched ``--fill-mb`` MiB of its RAM (1024; ``--quick`` 256), set up
by bench/_vm_site.py as bench/vm_state.py sets up its site, plus the second agent. Beside it the same guest
(same kernel, initramfs, command line and memory) under plain QEMU, filled the same way. ``--rounds``
migrations each (3; ``--quick`` 2), interleaved (the first side alternates), over loopback; each moves the
VM to the other host (plain: to a new QEMU launched ``-incoming defer`` beforehand, not timed).

* keysteward: ``POST /v1/vms/bench-vm/migrate`` (the ``vm migrate`` order: the CLI's own process start is
  left out) to the destination running the guest, as its host agent reports it (``running_at`` in its
  order's result: QEMU completed and running, before its first renewal). That covers the destination's
  order fetch, ``vm.migrate`` (policy, fresh evidence, incoming lease, its migration certificate), the disks
  opened and served, QEMU launched and listening, ``vm.migration_ready`` and the source's ``migrate-out``
  order, the source's certificate, the state over TLS, the ``vm.switchover`` round trip at
  ``pre-switchover`` and ``migrate-continue``. Downtime: the source QEMU's ``downtime`` (its order's
  ``downtime_ms``).
* plain QEMU: ``tls-creds-x509`` on both ends (``verify-peer``) from a throw-away CA, certificates made once
  before the rounds, no ``tls-authz``; from ``migrate`` to the source's ``completed``, plus the destination
  running (``cont`` when it did not autostart). Downtime: the source's ``downtime``.

Both sides set the same migration parameters: ``max-bandwidth`` 2^40 B/s (keysteward's MAX_BANDWIDTH: no
throttle), ``postcopy-ram`` off, ``events`` on, everything else QEMU's defaults (downtime-limit 300 ms, no
multifd), and both wait for QEMU the same way (keysteward.host.migration.wait_for: MIGRATION events).
The one difference: keysteward sets ``pause-before-switchover`` (the guest stays paused at
``pre-switchover`` while the source asks ``vm.switchover``, so that round trip is inside keysteward's
downtime); the plain reference runs without it, as a plain migration would.

Figures: ``migration_total_seconds`` (value = keysteward's median, reference = plain QEMU's, ratio =
reference / value, target >= 0.9) and ``migration_downtime_ms`` (the medians; target: value - reference
<= 50 ms). The last line is ``{"bench": "migration", "figures": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from statistics import median
from typing import Any

from _common import BenchError, Cleanup, _clean_env, keysteward_cli, run_bench, say
from _vm_site import HOST, TICK, VM, VmSite, _stop, make_site, plain_vm, wait_line

from keysteward.crypto import x509ca, x509csr
from keysteward.crypto.x509migration import issue_migration_cert, make_migration_csr, migration_hostname
from keysteward.devcloud.guest import guest_append
from keysteward.host import migration
from keysteward.host.qemu import MAX_BANDWIDTH, QemuError, QemuVm
from keysteward.host.running import run_name

BENCH = "migration"
SETTLE_SECONDS = 3.0
"""Before each timed migration, so both start from the same memory state: this machine is itself a VM
whose freed pages go back to its host a moment after they are freed (bench/vm_state.py says more); the
migration that came first in a round ran up to 1.6 times as long as the second, whichever side it was."""
OTHER = "host-b"
PLAIN_TLS = "plain-tls"


# -- the second host ---------------------------------------------------------------------------------------


def add_host(site: VmSite, cleanup: Cleanup, name: str) -> Path:
    """A second ``keysteward host run`` on this machine: its certificate, state directory and status file."""
    tmp = site.tmp
    key_pem, csr = x509csr.make_csr("bench", "host", name)
    issued = site.server.post_ok("/v1/ca/issue", {"name": name, "role": "host", "csr_pem": csr.decode()}, site.admin)
    (tmp / f"{name}.pem").write_text(issued["cert_pem"])
    (tmp / f"{name}.key").write_bytes(bytes(key_pem))
    (tmp / f"{name}.key").chmod(0o600)
    status = tmp / f"{name}.status.json"
    config = tmp / f"{name}.toml"
    config.write_text(
        f'state_dir = "{tmp}/{name}-run"\nsnapshot_dir = "{tmp}/{name}-snapshots"\npoll_seconds = 0.1\n'
        f'status_file = "{status}"\n[kms]\nurl = "{site.server.url}"\nca_file = "{site.server.ca_file}"\n'
        f'cert_file = "{tmp}/{name}.pem"\nkey_file = "{tmp}/{name}.key"\ngrace_seconds = 30\n[qemu]\naccel = "tcg"\n'
    )
    log = tmp / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([*keysteward_cli(), "host", "run", "--config", str(config)], stdout=out, stderr=out,
                                env=_clean_env(), start_new_session=True)  # fmt: skip
    cleanup.push(f"stop the host agent {name}", lambda: _stop(proc))
    deadline = time.monotonic() + 60
    while not status.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"host agent {name} did not come up: {log.read_text(errors='replace')[-600:]}")
        time.sleep(0.1)
    return tmp / f"{name}-run"


def serial_on(site: VmSite, host: str) -> Path:
    run = site.tmp / "host-run" if host == HOST else site.tmp / f"{host}-run"
    return run / run_name(site.vm_id) / "serial.log"


# -- keysteward ------------------------------------------------------------------------------------------


def _order(site: VmSite, order_id: str, timeout: float) -> dict[str, Any]:
    """The order once its host reported it (polled every 50 ms through the API)."""
    deadline = time.monotonic() + timeout
    while True:
        status, order = site.server.request("GET", f"/v1/vm-orders/{order_id}", token=site.admin)
        if status != 200:
            raise BenchError(f"GET /v1/vm-orders/{order_id} answered {status}: {order}")
        if order["state"] == "done":
            return dict(order)
        if order["state"] == "failed":
            raise BenchError(f"order {order['kind']} on {order['host']} failed: {order.get('result')}\n"
                             f"{site.log_tail()}")  # fmt: skip
        if time.monotonic() > deadline:
            raise BenchError(f"order {order_id} not done in {timeout:g} s")
        time.sleep(0.05)


def _source_order(site: VmSite, migration_id: str) -> str:
    """The source's ``migrate-out`` order of a migration (its id is in the ``vm.migration_ready`` record)."""
    status, page = site.server.request("GET", "/v1/audit?limit=5000", token=site.admin)
    if status != 200:
        raise BenchError(f"GET /v1/audit answered {status}")
    for record in reversed(page["records"]):
        body = json.loads(record["body"])
        details = body.get("details") or {}
        if body.get("action") == "vm.migration_ready" and details.get("migration") == migration_id:
            return str(details["source_order"])
    raise BenchError(f"no vm.migration_ready record for migration {migration_id}")


def migrate_keysteward(site: VmSite, to: str) -> tuple[float, float, dict[str, Any]]:
    """One ``vm migrate`` to ``to``: (seconds from the order to the destination running, downtime ms, results)."""
    serial = serial_on(site, to)
    began = time.time()
    order = site.server.post_ok(f"/v1/vms/{VM}/migrate", {"host": to}, site.admin)
    done = _order(site, order["id"], 900)
    source = _order(site, _source_order(site, order["id"]), 60)
    result, out = done["result"], source["result"]
    wait_line(serial, TICK, 60, start=0)
    return float(result["running_at"]) - began, float(out["downtime_ms"]), {"in": result, "out": out}


# -- plain QEMU ------------------------------------------------------------------------------------------


def plain_tls(site: VmSite) -> tuple[Path, Path, str]:
    """Static TLS credentials for both plain ends from a throw-away CA: (server dir, client dir, hostname)."""
    ca_pem, ca_key = x509ca.new_ca("bench plain migration CA")
    fixed = str(uuid.uuid4())
    dirs = []
    for end in ("destination", "source"):
        key_pem, csr = make_migration_csr(fixed, end)
        issued = issue_migration_cert(ca_pem, ca_key, migration_id=fixed, end=end, csr_pem=csr, minutes=60)
        home = site.tmp / f"{PLAIN_TLS}-{end}"
        home.mkdir(mode=0o700)
        dirs.append(migration.write_tls_dir(home, end, ca_pem, issued.cert_pem, key_pem))
    return dirs[0], dirs[1], migration_hostname(fixed)


def migrate_plain(source: QemuVm, dest: QemuVm, tls: tuple[Path, Path, str]) -> tuple[float, float]:
    """Plain QEMU TLS migration ``source`` -> ``dest``: (seconds from ``migrate`` to dest running, downtime ms)."""
    server_dir, client_dir, hostname = tls
    address = migration.free_address()
    dq = dest.monitor()
    dq.execute("object-add", {"qom-type": "tls-creds-x509", "id": "plain-tls-server", "dir": str(server_dir),
                              "endpoint": "server", "verify-peer": True})  # fmt: skip
    dq.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    dq.execute("migrate-set-parameters", {"tls-creds": "plain-tls-server"})
    dq.execute("migrate-incoming", {"uri": f"tcp:{address}"})
    sq = source.monitor()
    sq.execute("object-add", {"qom-type": "tls-creds-x509", "id": "plain-tls-client", "dir": str(client_dir),
                              "endpoint": "client", "verify-peer": True})  # fmt: skip
    # keysteward's capabilities but pause-before-switchover (a plain migration does not stop there)
    plain_caps = {**migration.CAPABILITIES, "pause-before-switchover": False}
    capabilities = [{"capability": name, "state": state} for name, state in plain_caps.items()]
    sq.execute("migrate-set-capabilities", {"capabilities": capabilities})
    sq.execute("migrate-set-parameters", {"tls-creds": "plain-tls-client", "tls-hostname": hostname,
                                          "max-bandwidth": MAX_BANDWIDTH})  # fmt: skip
    began = time.perf_counter()
    sq.execute("migrate", {"uri": f"tcp:{address}"})
    deadline = time.monotonic() + 900
    # waited for as keysteward's hosts wait (QEMU's MIGRATION events, the same helper), then the destination
    # runs (it autostarts; `cont` if it did not)
    try:
        info = migration.wait_for(source, "completed", deadline)
        migration.wait_for(dest, "completed", deadline)
        if dest.status() != "running":
            dq.execute("cont")
    except QemuError as exc:
        raise BenchError(f"plain migration: {exc.message}") from None
    ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
    say(f"    plain QEMU: total-time {info.get('total-time')} ms, setup {info.get('setup-time')} ms, "
        f"{int((ram or {}).get('transferred', 0)) / (1 << 20):.0f} MiB sent")  # fmt: skip
    return time.perf_counter() - began, float(info.get("downtime", 0))


def server_times(site: VmSite) -> str:
    """The key manager's own mean time per migration request (its /metrics latency histogram)."""
    req = urllib.request.Request(site.server.url + "/metrics")  # noqa: S310 - our https URL
    with urllib.request.urlopen(req, context=site.server._ssl, timeout=30) as resp:  # noqa: S310
        text = resp.read().decode()
    sums: dict[str, list[float]] = {}
    for name, route, value in re.findall(
        r'^keysteward_http_request_seconds_(sum|count)\{method="POST",route="([^"]+)"\} (\S+)$', text, re.MULTILINE
    ):
        sums.setdefault(route, [0.0, 0.0])[name == "count"] += float(value)
    parts = []
    for label, route in (("release", "/release/challenge"), ("vm.migrate", "/release"), ("ready", "/ready"),
                         ("source", "/source"), ("switchover", "/switchover"), ("progress", "/progress")):  # fmt: skip
        found = [v for r, v in sums.items() if r.endswith(route) and ("migrations" in r or label == "release")]
        total, count = (sum(v[0] for v in found), sum(v[1] for v in found))
        if count:
            parts.append(f"{label} {total / count * 1000:.0f} ms")
    return ", ".join(parts)


def _steps(steps: dict[str, Any]) -> str:
    return ", ".join(f"{name} {float(value) * 1000:.0f} ms" for name, value in steps.items())


# -- the figures -----------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, cleanup: Cleanup) -> list[dict[str, Any]]:
    site = make_site(cleanup, memory_mb=args.memory_mb, append=guest_append(fill_mb=args.fill_mb))
    add_host(site, cleanup, OTHER)
    filled = re.compile(rb"ks-guest filled mb=%d\s+ks-guest tick=" % args.fill_mb)
    tls = plain_tls(site)
    say(f"[migration] {args.memory_mb} MiB VMs, {args.fill_mb} MiB of RAM touched, {args.rounds} migrations each "
        "over loopback TLS, interleaved: plain QEMU (static certificates), keysteward (host-a <-> host-b)")  # fmt: skip
    plain_total: list[float] = []
    plain_down: list[float] = []
    ours_total: list[float] = []
    ours_down: list[float] = []
    vm = plain_vm(site, "mig0")
    try:
        vm.start()
        site.cli("vm", "start", VM, "--host", HOST)
        wait_line(vm.launch.serial_log, filled, 900, alive=vm._check_alive)
        wait_line(site.serial, filled, 900)
        where = HOST
        for n in range(args.rounds):
            for side in ("plain", "keysteward") if n % 2 == 0 else ("keysteward", "plain"):
                time.sleep(SETTLE_SECONDS)
                if side == "plain":
                    dest = plain_vm(site, f"mig{n + 1}", incoming=True)
                    dest.start()
                    try:
                        seconds, down = migrate_plain(vm, dest, tls)
                        wait_line(dest.launch.serial_log, TICK, 60, alive=dest._check_alive)
                    except (QemuError, BenchError):
                        dest.stop()
                        raise
                    vm.stop()
                    vm = dest
                    plain_total.append(seconds)
                    plain_down.append(down)
                else:
                    to = OTHER if where == HOST else HOST
                    seconds, down, results = migrate_keysteward(site, to)
                    where = to
                    ours_total.append(seconds)
                    ours_down.append(down)
                    steps_in, steps_out = results["in"].get("steps", {}), results["out"].get("steps", {})
                    say("    keysteward's hosts: destination " + _steps(steps_in) + "; source " + _steps(steps_out)
                        + f"; QEMU total {results['out']['total_time_ms']} ms, "
                        f"{results['out']['transferred_bytes'] / (1 << 20):.0f} MiB sent")  # fmt: skip
            say(f"  round {n + 1}: plain QEMU {plain_total[-1]:.2f} s, downtime {plain_down[-1]:.0f} ms; "
                f"keysteward {ours_total[-1]:.2f} s, downtime {ours_down[-1]:.0f} ms")  # fmt: skip
        say(f"  the key manager's mean time per request: {server_times(site)}")
    finally:
        vm.stop()
    total_p, total_o = median(plain_total), median(ours_total)
    down_p, down_o = median(plain_down), median(ours_down)
    say(f"  medians: total {total_p:.2f} s plain against {total_o:.2f} s keysteward (x{total_o / total_p:.2f}); "
        f"downtime {down_p:.0f} ms against {down_o:.0f} ms ({down_o - down_p:+.0f} ms)")  # fmt: skip
    ratio = total_p / total_o if total_o else 0.0
    added = down_o - down_p
    return [
        {"name": "migration_total_seconds", "value": round(total_o, 3), "unit": "s", "reference": round(total_p, 3),
         "ratio": round(ratio, 3), "target": 0.9, "ok": ratio >= 0.9},
        {"name": "migration_downtime_ms", "value": round(down_o, 1), "unit": "ms", "reference": round(down_p, 1),
         "ratio": round(down_o / down_p, 3) if down_p else 0.0, "added": round(added, 1), "target": 50.0,
         "ok": added <= 50.0},
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB touched of 512, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--fill-mb", type=int, default=None, help="guest RAM touched (1024; --quick 256)")
    parser.add_argument("--memory-mb", type=int, default=None, help="VM memory (1536; --quick 512)")
    args = parser.parse_args()
    args.fill_mb = args.fill_mb or (256 if args.quick else 1024)
    args.memory_mb = args.memory_mb or (512 if args.quick else 1536)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if not 16 <= args.fill_mb <= args.memory_mb - 192:
        parser.error("--fill-mb takes 16 up to --memory-mb less 192 (the guest's kernel and tmpfs need room)")
    if args.rounds < 1:
        parser.error("--rounds takes at least 1")
    return run_bench(BENCH, lambda cleanup: measure(args, cleanup), widths=(32, 5))


if __name__ == "__main__":
    sys.exit(main())
