"""keysteward server init|start|status|unseal|seal."""

from __future__ import annotations

import dataclasses
import getpass
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import console, emit, err_console, fields
from keysteward.settings import CONFIG_NAME, load

app = typer.Typer(help="Initialise, start, unseal and seal the key manager.", no_args_is_help=True)
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="KEYSTEWARD_DATA_DIR", help="Server data directory.")]


@app.command()
def init(
    data_dir: DataDir,
    seal: Annotated[str, typer.Option(help="Root key seal: shamir, pkcs11 or dev.")] = "shamir",
    threshold: Annotated[int, typer.Option(help="Shares needed to unseal (shamir).")] = 3,
    shares: Annotated[int, typer.Option(help="Shares made (shamir).")] = 5,
    insecure_dev_seal: Annotated[bool, typer.Option("--insecure-dev-seal", help="Accept the dev seal.")] = False,
    listen_host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    listen_port: Annotated[int, typer.Option(help="Port to listen on.")] = 8443,
    database_url: Annotated[str, typer.Option(help="SQLAlchemy URL (default: SQLite in the data dir).")] = "",
    pkcs11_module: Annotated[str, typer.Option(help="PKCS#11 module (pkcs11 seal).")] = "",
    pkcs11_token_label: Annotated[str, typer.Option(help="HSM token label (pkcs11 seal).")] = "",
    pkcs11_key_label: Annotated[str, typer.Option(help="Label of the HSM key to create.")] = "",
    pkcs11_pin_file: Annotated[str, typer.Option(help="File holding the HSM user PIN.")] = "",
    plain_http: Annotated[bool, typer.Option("--plain-http", help="No TLS (loopback only).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create the root key, seal it, and write the data directory. Prints unseal shares and the root token ONCE."""
    from keysteward.server.run import initialize

    settings = load(data_dir)
    server = dataclasses.replace(
        settings.server,
        listen_host=listen_host,
        listen_port=listen_port,
        database_url=database_url or settings.server.database_url,
        tls=not plain_http,
    )
    hsm: dict[str, Any] = {
        name: value
        for name, value in (
            ("pkcs11_module", pkcs11_module),
            ("pkcs11_token_label", pkcs11_token_label),
            ("pkcs11_key_label", pkcs11_key_label),
            ("pkcs11_pin_file", pkcs11_pin_file),
        )
        if value
    }
    seal_settings = dataclasses.replace(settings.seal, **hsm)
    settings = dataclasses.replace(settings, server=server, seal=seal_settings)
    out = initialize(settings, seal, threshold=threshold, shares=shares, allow_dev_seal=insecure_dev_seal)
    data = {
        "cluster_id": out.result.cluster_id,
        "seal_type": out.result.seal_type,
        "threshold": out.result.threshold,
        "unseal_shares": out.result.shares,
        "root_token": out.root_token.secret,
        "audit_public_key": out.result.audit_public_key,
        "url": out.url,
        "ca_file": str(out.ca_file) if out.settings.server.tls else None,
        "config": str(data_dir / CONFIG_NAME),
    }

    def human(d: dict[str, object]) -> None:
        console.print(f"[green]Initialised keysteward[/green] cluster {d['cluster_id']} ({d['seal_type']} seal)")
        if seal == "dev":
            console.print("[bold red]INSECURE: dev seal, the root key unseals from a file. Demo only.[/bold red]")
        for i, share in enumerate(out.result.shares, 1):
            console.print(f"Unseal share {i}: {share}")
        if out.result.shares:
            console.print(
                f"Give any {out.result.threshold} of them to 'keysteward server unseal'. "
                "They are shown now and never again: hand each to a different custodian."
            )
        fields(d, ["root_token", "audit_public_key", "url", "ca_file", "config"])
        console.print("The root token administers tenants and the seal; keep it offline.")

    emit(data, as_json, human)


@app.command()
def start(data_dir: DataDir) -> None:
    """Run the server in the foreground (TLS by default)."""
    from keysteward.logs import json_logging
    from keysteward.server.datadir import secure
    from keysteward.server.run import serve

    if not (data_dir / CONFIG_NAME).exists():
        raise typer.BadParameter(f"{data_dir} is not initialised: run 'keysteward server init' first")
    settings = load(data_dir)
    json_logging(settings.server.log_level)  # the server's log is JSON lines from its first line
    secure(data_dir, settings.database_url)  # repair modes changed since init (a restore, a copy, an editor)
    serve(settings)


SEALED_EXIT = 2


@app.command()
def status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Seal state, seal type and unseal progress. Exits 0 unsealed, 2 sealed, 1 on an error (as Vault does)."""
    data = client(ctx).get("/sys/status")

    def human(d: dict[str, object]) -> None:
        state = "[red]sealed[/red]" if d["sealed"] else "[green]unsealed[/green]"
        console.print(f"cluster {d['cluster_id']}: {state}, {d['seal_type']} seal")
        if d["seal_type"] == "shamir" and d["sealed"]:
            console.print(f"unseal progress: {d['progress']} of {d['threshold']} shares")
        if d["insecure"]:
            console.print(f"[bold red]INSECURE[/bold red]: {d['warning']}")

    emit(data, as_json, human)
    if data["sealed"]:
        raise SystemExit(SEALED_EXIT)


@app.command()
def unseal(
    ctx: typer.Context,
    share: Annotated[
        str | None, typer.Argument(help="One unseal share; read from stdin (or prompted) if absent.")
    ] = None,
    reset: Annotated[
        bool,
        typer.Option(
            "--reset", help="Forget the shares given so far (proven with your share, or with the root token)."
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Give one unseal share (any order); the server unseals when enough distinct shares are in."""
    api = client(ctx)
    if reset and api.options.token:
        emit(api.post("/sys/unseal/reset"), as_json, lambda d: console.print("unseal progress reset"))
        return
    if share is None:
        share = getpass.getpass("Unseal share: ") if sys.stdin.isatty() else sys.stdin.readline()
    if reset:  # the share proves the right to reset; it is checked, not counted
        data = api.post("/sys/unseal/reset", {"share": share.strip()})
        emit(data, as_json, lambda d: console.print("unseal progress reset"))
        return
    data = api.post("/sys/unseal", {"share": share.strip()})

    def human(d: dict[str, object]) -> None:
        if d["sealed"]:
            console.print(f"share accepted: {d['progress']} of {d['threshold']}; still sealed")
        else:
            console.print("[green]unsealed[/green]")

    emit(data, as_json, human)


@app.command()
def seal(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Drop all key material from the server's memory at once (system admin)."""
    data = client(ctx).post("/sys/seal")
    emit(data, as_json, lambda d: err_console.print("[yellow]sealed[/yellow]: key material dropped"))
