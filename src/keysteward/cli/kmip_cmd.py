"""keysteward kmip status|clients|objects|client: the KMIP front-end as its administrators see it (docs/kmip.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer

from keysteward.cli.confirm import confirm
from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import console, emit, fields, table
from keysteward.errors import BadRequest

app = typer.Typer(help="The KMIP listener: status, hypervisor clients, KMIP objects.", no_args_is_help=True)
pins = typer.Typer(help="Pinned self-signed hypervisor certificates (trust mode C).", no_args_is_help=True)
app.add_typer(pins, name="client")
MAX_CERT_FILE = 64 * 1024


@app.command("status")
def kmip_status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Whether the listener is on, and the tenant's KMIP objects by state."""
    emit(client(ctx).get("/kmip/status"), as_json, lambda d: fields(d, ["enabled", "listen", "total", "objects"]))


@app.command("clients")
def kmip_clients(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Hypervisor certificates of the tenant CA and pinned ones (trust pinned), and the objects each created."""
    columns = ["name", "trust", "serial", "not_after", "revoked", "objects_created"]
    emit(client(ctx).get("/kmip/clients"), as_json, lambda d: table(d, columns))


@app.command("objects")
def kmip_objects(
    ctx: typer.Context,
    stale_days: Annotated[
        int | None, typer.Option(help="Only keys no client fetched for this many days (vCenter never deletes).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """KMIP objects (no material), with the VM each was for (x-Name) and when a client last fetched it."""
    path = "/kmip/objects" + (f"?stale_days={stale_days}" if stale_days is not None else "")
    columns = ["uid", "state", "vm", "x_component", "created_by", "last_get_at"]
    emit(client(ctx).get(path), as_json, lambda d: table(d, columns))


@pins.command("add")
def client_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The hypervisor's machine name (role hypervisor), e.g. vcsa-1.")],
    cert: Annotated[Path, typer.Option("--cert", help="Its self-signed certificate (PEM), as vCenter gave it.")],
    as_json: JsonFlag = False,
) -> None:
    """Accept exactly this self-signed certificate as the hypervisor NAME of your tenant (vCenter: Make KMS trust
    vCenter, vCenter certificate)."""
    try:
        with cert.open("rb") as f:
            raw = f.read(MAX_CERT_FILE + 1)
    except OSError as exc:
        raise BadRequest(f"cannot read {cert}: {exc.strerror}", code="bad_client_cert") from None
    if len(raw) > MAX_CERT_FILE:
        raise BadRequest(f"{cert} is larger than 64 KiB: not one certificate", code="bad_client_cert")
    text = raw.decode("ascii", errors="replace")
    done = client(ctx).post("/kmip/client-pins", {"name": name, "cert_pem": text})
    emit(done, as_json, lambda d: console.print(f"pinned hypervisor:{d['name']} sha256:{d['fingerprint']}"))


@pins.command("list")
def client_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The pinned hypervisor certificates of your tenant."""
    columns = ["name", "fingerprint", "subject", "not_after", "created_by"]
    emit(client(ctx).get("/kmip/client-pins"), as_json, lambda d: table(d, columns))


@pins.command("remove")
def client_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The pinned hypervisor's name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Stop accepting a pinned certificate: every server refuses it within a second, open connections too."""
    confirm(f"Unpin hypervisor:{name}: its KMIP connections are refused from now on?", yes=yes)
    done = client(ctx).delete(f"/kmip/client-pins/{quote(name, safe='')}")
    emit(done, as_json, lambda d: console.print(f"unpinned hypervisor:{d['name']} sha256:{d['fingerprint']}"))
