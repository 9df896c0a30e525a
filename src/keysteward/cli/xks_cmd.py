"""keysteward xks ...: AWS KMS external key stores, their SigV4 credentials and external keys (docs/xks.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keysteward.cli.confirm import confirm
from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import console, emit, fields, table
from keysteward.cli.typer_values import renamed

app = typer.Typer(help="AWS KMS external key stores (XKS): stores, credentials, external keys.", no_args_is_help=True)
store_app = typer.Typer(help="External key stores: one URI path prefix each.", no_args_is_help=True)
credential_app = typer.Typer(
    help="A store's SigV4 credentials (at least two may be active at once).", no_args_is_help=True
)
key_app = typer.Typer(help="A store's external keys.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(credential_app, name="credential")
app.add_typer(key_app, name="key")
Store = Annotated[str, typer.Option("--store", help="The store's URI path prefix.")]
KEY_COLUMNS = ["id", "store", "key", "usage", "state"]


def _show_secret(d: dict[str, Any]) -> None:
    fields(d, [k for k in ("prefix", "uri_path", "region", "store", "access_key_id", "secret_access_key") if k in d])
    console.print("The secret access key is shown this once: give it to AWS KMS (CreateCustomKeyStore).")


@store_app.command("create")
def store_create(
    ctx: typer.Context,
    prefix: str,
    region: Annotated[str, typer.Option(help="The AWS region of the KMS that calls this store.")] = "us-east-1",
    as_json: JsonFlag = False,
) -> None:
    """Create a store at PREFIX and its first SigV4 credential."""
    emit(client(ctx).post("/xks/stores", {"prefix": prefix, "region": region}), as_json, _show_secret)


@store_app.command("list")
def store_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    emit(
        client(ctx).get("/xks/stores"),
        as_json,
        lambda d: table(d, ["prefix", "uri_path", "region", "active_credentials", "created_at"]),
    )


@credential_app.command("add")
def credential_add(ctx: typer.Context, store: Store, as_json: JsonFlag = False) -> None:
    """A new credential for the store; the old ones keep working until retired."""
    emit(client(ctx).post("/xks/credentials", {"store": store}), as_json, _show_secret)


@credential_app.command("list")
def credential_list(ctx: typer.Context, store: Store, as_json: JsonFlag = False) -> None:
    emit(
        client(ctx).get("/xks/credentials", params={"store": store}),
        as_json,
        lambda d: table(d, ["access_key_id", "active", "created_at", "retired_at"]),
    )


@credential_app.command("retire")
def credential_retire(
    ctx: typer.Context,
    access_key_id: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Stop accepting a credential (on every server within a second)."""
    confirm(f"Retire credential {access_key_id}? AWS KMS calls signed with it fail from now on.", yes=yes)
    emit(
        client(ctx).post(f"/xks/credentials/{access_key_id}/retire"),
        as_json,
        lambda d: fields(d, ["access_key_id", "store", "retired_at"]),
    )


@key_app.command("create")
def key_create(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The external key id AWS KMS will name.")],
    store: Store,
    usage: Annotated[str, typer.Option(help="both | encrypt | decrypt | none")] = "both",
    key_name: Annotated[
        str | None,
        typer.Option("--key-name", metavar="NAME", help="Name of the new tenant key (default: ID in lower case)."),
    ] = None,
    old_key: Annotated[str | None, typer.Option("--key", hidden=True, help="Old spelling of --key-name.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """A new external key: a new tenant key whose versions do its AES-GCM."""
    key = renamed(ctx, "key_name", key_name, old_key, "--key-name", "--key")
    body = {"id": key_id, "store": store, "usage": usage, "key": key}
    emit(client(ctx).post("/xks/keys", body), as_json, lambda d: fields(d, KEY_COLUMNS))


@key_app.command("list")
def key_list(ctx: typer.Context, store: Store, as_json: JsonFlag = False) -> None:
    emit(client(ctx).get("/xks/keys", params={"store": store}), as_json, lambda d: table(d, KEY_COLUMNS))


@key_app.command("disable")
def key_disable(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(metavar="ID")], store: Store, as_json: JsonFlag = False
) -> None:
    emit(client(ctx).post(f"/xks/keys/{key_id}/disable", {"store": store}), as_json, lambda d: fields(d, KEY_COLUMNS))


@key_app.command("enable")
def key_enable(
    ctx: typer.Context, key_id: Annotated[str, typer.Argument(metavar="ID")], store: Store, as_json: JsonFlag = False
) -> None:
    emit(client(ctx).post(f"/xks/keys/{key_id}/enable", {"store": store}), as_json, lambda d: fields(d, KEY_COLUMNS))
