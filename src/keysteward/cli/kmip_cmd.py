"""keysteward kmip status|clients|objects: the KMIP front-end as its administrators see it (docs/kmip.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import emit, fields, table

app = typer.Typer(help="The KMIP listener: status, hypervisor clients, KMIP objects.", no_args_is_help=True)


@app.command("status")
def kmip_status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Whether the listener is on, and the tenant's KMIP objects by state."""
    emit(client(ctx).get("/kmip/status"), as_json, lambda d: fields(d, ["enabled", "listen", "total", "objects"]))


@app.command("clients")
def kmip_clients(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Hypervisor certificates of the tenant CA, and the objects each created."""
    columns = ["name", "serial", "not_after", "revoked", "objects_created"]
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
