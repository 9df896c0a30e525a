"""keysteward vm create|list|show|start|stop|snapshot|suspend|restore|resume|migrate|revoke|destroy (docs/hosts.md).

A VM is registered in the tenant with its own key and its volumes; ``start``, ``stop``, ``snapshot``,
``suspend`` and ``restore`` are orders to a host agent, which carries them out through the access path.
These verbs wait for the host's answer (``--wait`` seconds) and print it; a refusal prints the reason code
and the policies that refused, and exits 1.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from keysteward.cli.client import Client
from keysteward.cli.confirm import confirm
from keysteward.cli.context import JsonFlag, client
from keysteward.cli.migrate_progress import MigrationBar, read_progress
from keysteward.cli.output import console, emit, fields, table
from keysteward.cli.typer_values import labels_option, renamed
from keysteward.errors import Conflict, Denied, KeystewardError

app = typer.Typer(help="VMs of hypervisor hosts: their keys, disks, starts, snapshots and restores.",
                  no_args_is_help=True)  # fmt: skip
Ref = Annotated[str, typer.Argument(help="The VM's name or id.")]
Yes = Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")]
Wait = Annotated[float, typer.Option("--wait", help="Seconds to wait for the host's answer.")]
Host = Annotated[str, typer.Option("--host", help="The host (its certificate's name) that runs the VM.")]
DOWNTIME_WAIT = 3.0
COLUMNS = ["name", "state", "host", "memory_mb", "cpus", "disks", "key", "id"]


def _row(vm: dict[str, Any]) -> dict[str, Any]:
    return {**vm, "disks": ", ".join(d["volume"] for d in vm.get("disks", []))}


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The VM's name in the tenant.")],
    volume: Annotated[
        list[str],
        typer.Option(
            "--volume",
            help="A volume of the VM, as NAME=PATH: its name (or "
            "id) in the key manager and its file on the hosts. Repeatable.",
        ),
    ] = [],  # noqa: B006
    key_name: Annotated[
        str, typer.Option("--key-name", metavar="NAME", help="The tenant key that wraps the VM's key.")
    ] = "default",
    old_key: Annotated[str | None, typer.Option("--key", hidden=True, help="Old spelling of --key-name.")] = None,
    memory: Annotated[int, typer.Option("--memory", help="Memory in MiB.")] = 512,
    cpus: Annotated[int, typer.Option("--cpus", help="Virtual CPUs.")] = 1,
    kernel: Annotated[str | None, typer.Option(help="Kernel for a direct boot (path on the hosts).")] = None,
    initrd: Annotated[str | None, typer.Option(help="Initrd for a direct boot (path on the hosts).")] = None,
    append: Annotated[str | None, typer.Option(help="Kernel command line.")] = None,
    lease_seconds: Annotated[int, typer.Option(help="Lease length; a host renews every --renew-seconds.")] = 60,
    renew_seconds: Annotated[int, typer.Option(help="How often the host renews the VM's lease.")] = 10,
    label: Annotated[
        list[str], typer.Option("--label", metavar="K=V", help="A label policies read (repeatable).")
    ] = [],  # noqa: B006
    as_json: JsonFlag = False,
) -> None:
    """Register a VM: a per-VM key in the tenant's hierarchy, its volumes bound to it, its launch settings."""
    disks = []
    for item in volume:
        ref, sep, path = item.partition("=")
        if not sep or not ref or not path.startswith("/"):
            raise typer.BadParameter(f"--volume {item!r}: use NAME=/absolute/path/on/the/hosts")
        disks.append({"volume": ref, "path": path})
    labels = labels_option(label)
    key = renamed(ctx, "key_name", key_name, old_key, "--key-name", "--key")
    launch = {k: v for k, v in {"kernel": kernel, "initrd": initrd, "append": append}.items() if v is not None}
    body = {"name": name, "key": key, "memory_mb": memory, "cpus": cpus, "disks": disks, "launch": launch,
            "lease_seconds": lease_seconds, "renew_seconds": renew_seconds, "labels": labels}  # fmt: skip
    made = client(ctx).post("/vms", body)
    emit(made, as_json, lambda d: console.print(f"VM {d['name']} created ({d['id']}), {len(d['disks'])} disk(s)"))


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The tenant's VMs: state, the host running each (its live lease), disks."""
    emit(client(ctx).get("/vms"), as_json, lambda rows: table([_row(r) for r in rows], COLUMNS))


@app.command("show")
def show(ctx: typer.Context, ref: Ref, as_json: JsonFlag = False) -> None:
    """One VM: its settings, disks, the host running it and its snapshots."""

    def human(vm: dict[str, Any]) -> None:
        fields(_row(vm), ["name", "id", "state", "host", "lease_expires_at", "key", "key_version", "memory_mb",
                          "cpus", "disks", "launch"])  # fmt: skip
        if vm.get("snapshots"):
            table(vm["snapshots"], ["id", "state", "size", "host", "created_at", "path"], title="snapshots")

    emit(client(ctx).get(f"/vms/{ref}"), as_json, human)


def _order(api: Client, ref: str, kind: str, body: dict[str, Any], wait: float, watch: Any = None) -> dict[str, Any]:
    order = api.post(f"/vms/{ref}/{kind}", body)
    deadline = time.monotonic() + wait
    while order["state"] in ("pending", "taken"):
        if watch is not None:
            watch(order)
        if time.monotonic() > deadline:
            raise Conflict(f"host {order['host']} did not answer order {order['id']} in {wait:g} s "
                           f"(is `keysteward host run` up there?)", code="order_timeout")  # fmt: skip
        time.sleep(0.2)
        order = api.get(f"/vm-orders/{order['id']}")
    if order["state"] == "failed":
        result = order.get("result") or {}
        raise Denied(f"host {order['host']}: {result.get('message', 'failed')}", code=str(result.get("code", "failed")))
    done: dict[str, Any] = order
    return done


def _done(ctx: typer.Context, ref: str, kind: str, body: dict[str, Any], wait: float, as_json: bool, say: str) -> None:
    order = _order(client(ctx), ref, kind, body, wait)
    result = order.get("result") or {}
    values = _Values({**result, "host": order["host"], "vm": order["vm"]})
    emit(order, as_json, lambda _: console.print(say.format_map(values)))


class _Values(dict[str, Any]):
    """A host's result for a message: a field it did not send reads as ``?``, never as a KeyError."""

    def __missing__(self, key: str) -> str:
        return "?"


@app.command("start")
def start(ctx: typer.Context, ref: Ref, host: Host, wait: Wait = 180.0, as_json: JsonFlag = False) -> None:
    """Start the VM on HOST: the host proves itself (certificate, TPM quote, hardware), the policy decides."""
    _done(ctx, ref, "start", {"host": host}, wait, as_json, "VM {vm} started on {host} ({accel})")


@app.command("stop")
def stop(ctx: typer.Context, ref: Ref, wait: Wait = 60.0, as_json: JsonFlag = False) -> None:
    """Stop the VM where it runs: the guest ends, the host wipes its keys and gives the lease back."""
    _done(ctx, ref, "stop", {}, wait, as_json, "VM {vm} stopped on {host}")


@app.command("snapshot")
def snapshot(ctx: typer.Context, ref: Ref, wait: Wait = 600.0, as_json: JsonFlag = False) -> None:
    """Save the running VM's memory and device state, encrypted under its key; the VM runs on."""
    _done(ctx, ref, "snapshot", {}, wait, as_json, "VM {vm}: snapshot {snapshot} saved on {host} ({size} bytes)")


@app.command("suspend")
def suspend(ctx: typer.Context, ref: Ref, wait: Wait = 600.0, as_json: JsonFlag = False) -> None:
    """Save the VM's state encrypted, then stop it (resume with `vm resume` or `vm restore`)."""
    _done(ctx, ref, "suspend", {}, wait, as_json, "VM {vm} suspended: snapshot {snapshot} ({size} bytes)")


@app.command("restore")
def restore(
    ctx: typer.Context, ref: Ref, snapshot_id: Annotated[str, typer.Argument(metavar="SNAPSHOT", help="Its id.")],
    host: Host, wait: Wait = 600.0, as_json: JsonFlag = False,
) -> None:  # fmt: skip
    """Start the VM on HOST from a snapshot: released only to a host the policy permits, checked whole first."""
    _done(ctx, ref, "restore", {"host": host, "snapshot": snapshot_id}, wait, as_json,
          "VM {vm} restored on {host} in {seconds} s")  # fmt: skip


@app.command("resume")
def resume(ctx: typer.Context, ref: Ref, host: Host, wait: Wait = 600.0, as_json: JsonFlag = False) -> None:
    """Restore the VM's latest saved snapshot on HOST."""
    saved = [s for s in client(ctx).get(f"/vms/{ref}").get("snapshots", []) if s["state"] == "saved"]
    if not saved:
        raise KeystewardError(f"VM {ref} has no saved snapshot", code="snapshot_not_found")
    restore(ctx, ref, saved[-1]["id"], host, wait, as_json)


@app.command("migrate")
def migrate(
    ctx: typer.Context, ref: Ref,
    to: Annotated[str | None, typer.Option("--to", help="The destination host (its certificate's name).")] = None,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel the VM's migration before its switchover.")] = False,
    wait: Wait = 600.0, as_json: JsonFlag = False,
) -> None:  # fmt: skip
    """Live-migrate the VM to HOST: the destination proves itself as for a start, the channel is TLS with
    certificates made for this migration, and the VM's lease moves from source to destination at switchover.
    On a terminal a progress bar shows the RAM transferred and remaining, then the downtime. With --cancel,
    the VM's open migration ends before its switchover: the guest runs on at its source, the destination
    lets go of its keys."""
    api = client(ctx)
    if cancel == (to is not None):
        raise typer.BadParameter("give --to HOST to migrate, or --cancel alone", param_hint="'--to'")
    if cancel:
        done = api.post(f"/vms/{ref}/migration/cancel", {})
        emit(done, as_json, lambda d: console.print(f"migration {d['migration']} of VM {ref} cancelled "
                                                    f"(it was {d['was']})"))  # fmt: skip
        return
    with MigrationBar(not as_json) as bar:
        order = _order(api, ref, "migrate", {"host": to}, wait, bar.update)
    # the source reports the downtime once its QEMU completed: as the destination's answer, or soon after
    deadline = time.monotonic() + DOWNTIME_WAIT
    while (progress := read_progress(order)) is None or progress.downtime_ms is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        order = api.get(f"/vm-orders/{order['id']}")
    result = order.get("result") or {}
    downtime = f", downtime {progress.downtime_ms} ms" if progress and progress.downtime_ms is not None else ""
    values = _Values({**result, "host": order["host"], "vm": order["vm"]})
    say = "VM {vm} migrated from {source} to {host} in {seconds} s" + downtime
    emit(order, as_json, lambda _: console.print(say.format_map(values)))


@app.command("revoke")
def revoke(
    ctx: typer.Context, ref: Ref, reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    yes: Yes = False, as_json: JsonFlag = False,
) -> None:  # fmt: skip
    """The host's next renewal answers revoked: the guest is paused and ended, its keys wiped there."""
    confirm(f"Revoke VM {ref}?", yes=yes)
    emit(client(ctx).post(f"/vms/{ref}/revoke", {"reason": reason}), as_json,
         lambda d: console.print(f"VM {d['name']} revoked"))  # fmt: skip


@app.command("destroy")
def destroy(
    ctx: typer.Context, ref: Ref, reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    yes: Yes = False, as_json: JsonFlag = False,
) -> None:  # fmt: skip
    """Crypto-shred the VM's key and its disks' keys: its snapshots and volumes become unreadable."""
    confirm(f"Destroy VM {ref}, its snapshots and its disks' keys (irreversible)?", yes=yes)
    emit(client(ctx).post(f"/vms/{ref}/destroy", {"reason": reason}), as_json,
         lambda d: console.print(f"VM {d['name']} destroyed"))  # fmt: skip
