"""keysteward backup create|verify|restore: a consistent copy of the database, taken while the server runs.

These verbs read the server's settings from its data directory (as ``server start`` does) and talk to its
database directly, not to the server: run them as the server's user on a server host. See docs/ha.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from keysteward.cli.context import JsonFlag
from keysteward.cli.output import console, emit, err_console, fields
from keysteward.cli.server_cmd import DataDir
from keysteward.settings import CONFIG_NAME, load

app = typer.Typer(help="Back up the key manager's database, and restore it.", no_args_is_help=True)
BackupFile = Annotated[Path, typer.Argument(help="The backup file.", dir_okay=False)]


def _info(info: Any) -> dict[str, Any]:
    return {
        "file": str(info.path),
        "created_at": info.created_at,
        "engine": info.engine,
        "schema_revision": info.schema_revision,
        "cluster_id": info.cluster_id,
        "rows": sum(info.rows.values()),
    }


@app.command()
def create(
    data_dir: DataDir,
    output: Annotated[Path, typer.Option("--output", help="The backup file to write (must not exist).")],
    as_json: JsonFlag = False,
) -> None:
    """Write a backup of the database while the server runs: one consistent snapshot, wrapped keys only."""
    from keysteward.store import backup
    from keysteward.store.db import Database

    if not (data_dir / CONFIG_NAME).exists():
        raise typer.BadParameter(f"{data_dir} is not initialised: there is nothing to back up")
    settings = load(data_dir)
    db = Database(settings.database_url, sqlite_synchronous=settings.storage.sqlite_synchronous, pool_size=1)
    try:
        info = backup.create(db, output)
    finally:
        db.dispose()

    def human(d: dict[str, Any]) -> None:
        console.print(f"[green]backed up[/green] {d['rows']} rows of cluster {d['cluster_id']} to {d['file']}")
        fields(d, ["created_at", "engine", "schema_revision"])
        err_console.print(
            "The unseal shares (or the HSM key), the TLS files and the configuration are not in it: see docs/ha.md."
        )

    emit(_info(info), as_json, human)


@app.command()
def verify(file: BackupFile, as_json: JsonFlag = False) -> None:
    """Read a backup in full and check its header, digest and rows, without restoring it."""
    from keysteward.store import backup

    emit(_info(backup.check(file)), as_json, lambda d: console.print(f"[green]backup OK[/green]: {d['rows']} rows"))


@app.command()
def restore(
    data_dir: DataDir,
    file: BackupFile,
    database_url: Annotated[
        str, typer.Option(help="Fresh data directory only: the empty database (default: SQLite in it).")
    ] = "",
    listen_host: Annotated[str, typer.Option(help="Fresh data directory only: address to listen on.")] = "127.0.0.1",
    listen_port: Annotated[int, typer.Option(help="Fresh data directory only: port to listen on.")] = 8443,
    plain_http: Annotated[bool, typer.Option("--plain-http", help="Fresh data directory only: no TLS.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Restore a backup into a fresh data directory or an empty database; the server then starts sealed."""
    from keysteward.server.restore import Target
    from keysteward.server.restore import restore as run_restore

    done = run_restore(file, data_dir, Target(database_url, listen_host, listen_port, not plain_http))
    data = {
        **_info(done.info),
        "data_dir": str(data_dir),
        "config": str(data_dir / CONFIG_NAME),
        "made_config": done.made_data_dir,
        "ca_file": done.settings.server.tls_ca or None,
    }

    def human(d: dict[str, Any]) -> None:
        console.print(f"[green]restored[/green] {d['rows']} rows of cluster {d['cluster_id']} into {d['data_dir']}")
        fields(d, ["created_at", "config", "ca_file"])
        err_console.print(
            f"[yellow]The state is as of {d['created_at']}[/yellow]: keys destroyed, volumes revoked and tokens "
            "removed after that are back; do them again (docs/ha.md). Start the server and unseal it."
        )

    emit(data, as_json, human)
