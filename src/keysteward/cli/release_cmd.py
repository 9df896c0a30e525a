"""keysteward provider|instance|lease: who may receive keys, revoking instances, the leases they hold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keysteward.cli.confirm import confirm
from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import console, emit, table

provider_app = typer.Typer(help="Clouds whose signed instance identities this tenant trusts.", no_args_is_help=True)
instance_app = typer.Typer(
    help="Instances (provider/account/instance-id) and hosts (host:NAME): list them, revoke one.",
    no_args_is_help=True,
)
lease_app = typer.Typer(help="Leases: which instance holds which volume's key until when.", no_args_is_help=True)


@provider_app.command("add")
def provider_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The provider's name in instance identities and bindings.")],
    kind: Annotated[str, typer.Option(help="aws-iid (PKCS#7 documents) or gcp-jwt (identity tokens).")],
    cert: Annotated[Path, typer.Option(help="The provider's signing certificate(s), PEM.")],
    audience: Annotated[str | None, typer.Option(help="gcp-jwt: the audience its tokens must carry.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Trust a provider's identity signing certificates (for `keysteward devcloud`: `devcloud certificate`)."""
    body = {"name": name, "kind": kind, "certificates_pem": cert.read_text(), "audience": audience}
    emit(
        client(ctx).post("/providers", body),
        as_json,
        lambda d: console.print(f"provider {d['name']} ({d['kind']}) added"),
    )


@provider_app.command("list")
def provider_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    emit(
        client(ctx).get("/providers"),
        as_json,
        lambda rows: table(
            [dict(r, certificates="; ".join(r["certificates"])) for r in rows],
            ["name", "kind", "audience", "certificates"],
        ),
    )


@provider_app.command("remove")
def provider_remove(ctx: typer.Context, name: str) -> None:
    client(ctx).delete(f"/providers/{name}")
    console.print(f"provider {name} removed")


@instance_app.command("revoke")
def instance_revoke(
    ctx: typer.Context,
    instance: Annotated[
        str, typer.Argument(help="provider/account/instance-id or host:NAME, as leases and the audit log show it.")
    ],
    shred: Annotated[
        bool, typer.Option(help="Also make its agent remove the keysteward keyslot from its volumes.")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")] = False,
) -> None:
    """The instance's next renewal answers revoked (or shred); no release goes to it any more."""
    body: dict[str, object] = {"shred": shred, "reason": reason}
    parts = instance.split("/")
    if instance.startswith("host:"):
        body["host"] = instance.removeprefix("host:")
    elif len(parts) == 3 and all(parts):
        body.update(provider=parts[0], account=parts[1], instance_id=parts[2])
    else:
        raise typer.BadParameter("name the instance as provider/account/instance-id, or a host as host:NAME")
    confirm(f"Revoke {instance}" + (" and shred its keyslots" if shred else "") + "?", yes=yes)
    client(ctx).post("/instances/revoke", body)
    console.print(f"instance {instance} revoked" + (" (shred)" if shred else ""))


@instance_app.command("list")
def instance_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Instances and hosts that held a volume's key, or were revoked: live leases, last release, revocation."""
    emit(
        client(ctx).get("/instances"),
        as_json,
        lambda rows: table(rows, ["holder", "live_leases", "last_release_at", "revoked", "shred", "reason"]),
    )


@lease_app.command("list")
def lease_list(
    ctx: typer.Context,
    volume: Annotated[str | None, typer.Option(help="Only this volume (name or id).")] = None,
    as_json: JsonFlag = False,
) -> None:
    params = {"volume": volume} if volume else None
    emit(
        client(ctx).get("/leases", params=params),
        as_json,
        lambda rows: table(rows, ["id", "volume_id", "holder", "state", "expires_at"]),
    )
