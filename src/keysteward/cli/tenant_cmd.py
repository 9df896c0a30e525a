"""keysteward tenant create|list, token create|list|revoke, whoami."""

from __future__ import annotations

from typing import Annotated

import typer

from keysteward.cli.confirm import confirm
from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import console, emit, fields, table
from keysteward.cli.typer_values import duration_option

tenant_app = typer.Typer(help="Tenants (system admins).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens for people (tenant admins).", no_args_is_help=True)


@tenant_app.command("create")
def tenant_create(
    ctx: typer.Context,
    name: str,
    first_admin: Annotated[str, typer.Option(help="Name of the first admin token.")] = "admin",
    as_json: JsonFlag = False,
) -> None:
    """Create a tenant; prints its first admin token once."""
    data = client(ctx).post("/tenants", {"name": name, "first_admin": first_admin})

    def human(d: dict[str, dict[str, object]]) -> None:
        console.print(f"tenant [bold]{d['tenant']['name']}[/bold] created ({d['tenant']['id']})")
        console.print(f"admin token (shown once): {d['admin_token']['token']}")

    emit(data, as_json, human)


@tenant_app.command("list")
def tenant_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    emit(client(ctx).get("/tenants"), as_json, lambda d: table(d, ["name", "id", "created_at"]))


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option(help="admin, security-officer or auditor.")] = "auditor",
    person: Annotated[
        str | None,
        typer.Option(help="The person the token belongs to (approvals count people); default: a person named NAME."),
    ] = None,
    ttl: Annotated[
        str | None,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            help="The token expires this long after now, e.g. 90m, 12h, 30d (default: it lives until revoked).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an API token for a person; the secret is shown once."""
    body: dict[str, str | int] = {"name": name, "role": role}
    if person is not None:
        body["person"] = person
    if ttl is not None:
        body["ttl_seconds"] = duration_option(ttl, "--ttl")
    data = client(ctx).post("/tokens", body)
    emit(data, as_json, lambda d: fields(d, ["id", "name", "role", "person", "expires_at", "token"]))


@token_app.command("list")
def token_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The tenant's tokens: whose, which role, when each expires (times in UTC), whether revoked."""
    columns = ["id", "name", "person", "role", "created_at", "expires_at", "created_by", "revoked"]
    emit(client(ctx).get("/tokens"), as_json, lambda d: table(d, columns))


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context,
    token_id: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")] = False,
    as_json: JsonFlag = False,
) -> None:
    confirm(f"Revoke token {token_id}?", yes=yes)
    client(ctx).delete(f"/tokens/{token_id}")
    emit({"revoked": token_id}, as_json, lambda d: console.print(f"token {token_id} revoked"))


def whoami(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Show the identity the server sees."""
    emit(client(ctx).get("/whoami"), as_json, lambda d: fields(d, ["tenant", "role", "name", "kind", "person"]))
