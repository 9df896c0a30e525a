"""keysteward key ... (KEK lifecycle) and data-key ... (DEKs stored by the server)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keysteward.cli.confirm import confirm
from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import cell, console, emit, fields, table

key_app = typer.Typer(help="Tenant keys (KEKs): create, rotate, disable, destroy.", no_args_is_help=True)
dek_app = typer.Typer(help="Data keys the server creates and stores wrapped.", no_args_is_help=True)


def show_key(d: dict[str, Any]) -> None:
    fields(d, ["name", "id", "state", "primary_version", "description", "created_at"])
    if d.get("versions"):
        table(d["versions"], ["version", "state", "data_keys", "created_at", "destroyed_at"], title="versions")
    if d.get("rotation"):
        console.print("rewrap: " + cell(d["rotation"]), markup=False, highlight=False)


@key_app.command("create")
def key_create(
    ctx: typer.Context,
    name: str,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    as_json: JsonFlag = False,
) -> None:
    emit(client(ctx).post("/keys", {"name": name, "description": description}), as_json, show_key)


@key_app.command("list")
def key_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    emit(client(ctx).get("/keys"), as_json, lambda d: table(d, ["name", "state", "primary_version", "created_at"]))


@key_app.command("describe")
def key_describe(ctx: typer.Context, name: str, as_json: JsonFlag = False) -> None:
    emit(client(ctx).get(f"/keys/{name}"), as_json, show_key)


@key_app.command("rotate")
def key_rotate(ctx: typer.Context, name: str, as_json: JsonFlag = False) -> None:
    """New primary version; stored data keys are rewrapped in the background (no data touched)."""
    emit(client(ctx).post(f"/keys/{name}/rotate"), as_json, show_key)


@key_app.command("disable")
def key_disable(ctx: typer.Context, name: str, as_json: JsonFlag = False) -> None:
    emit(client(ctx).post(f"/keys/{name}/disable"), as_json, show_key)


@key_app.command("enable")
def key_enable(ctx: typer.Context, name: str, as_json: JsonFlag = False) -> None:
    emit(client(ctx).post(f"/keys/{name}/enable"), as_json, show_key)


@key_app.command("destroy-version")
def key_destroy_version(
    ctx: typer.Context,
    name: str,
    version: int,
    force: Annotated[bool, typer.Option("--force", help="Also shred data keys still under it.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Crypto-shred one version: whatever it encrypted is unrecoverable afterwards."""
    confirm(f"Destroy version {version} of '{name}' for good?", yes=yes)
    emit(client(ctx).post(f"/keys/{name}/versions/{version}/destroy", {"force": force}), as_json, show_key)


@key_app.command("destroy")
def key_destroy(
    ctx: typer.Context,
    name: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Crypto-shred the whole key and every data key under it."""
    confirm(f"Destroy key '{name}' and everything encrypted under it, for good?", yes=yes)
    emit(client(ctx).post(f"/keys/{name}/destroy"), as_json, show_key)


@dek_app.command("create")
def dek_create(ctx: typer.Context, key: str, name: str, as_json: JsonFlag = False) -> None:
    """Create a data key under KEY, held by the server (released later to approved instances)."""
    data = client(ctx).post(f"/keys/{key}/data-keys", {"name": name})
    emit(data, as_json, lambda d: fields(d, ["id", "name", "key", "kek_version", "created_at"]))


@dek_app.command("list")
def dek_list(ctx: typer.Context, key: str, as_json: JsonFlag = False) -> None:
    emit(
        client(ctx).get(f"/keys/{key}/data-keys"),
        as_json,
        lambda d: table(d, ["name", "id", "kek_version", "shredded", "created_at"]),
    )
