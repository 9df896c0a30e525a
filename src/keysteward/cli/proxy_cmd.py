"""keysteward proxy serve|check: the NBD proxy that serves decrypted volumes, the key kept out of the guest.

``serve --config FILE`` runs the proxy until SIGTERM (SIGHUP reloads the export list): docs/proxy.md.
``check --config FILE`` reads and validates the config and looks at the files it names; it opens no volume,
asks the key manager for nothing and listens on nothing. Its one line (or ``--json``) says what would be
served. The proxy's modules load when a command runs.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from keysteward.errors import KeystewardError

app = typer.Typer(
    name="proxy",
    help="The NBD proxy: serve LUKS2 volumes decrypted over NBD (TLS), keys released to this host.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[str, typer.Option("--config", metavar="FILE", help="The proxy's TOML config.")]
DEFAULT_CONFIG = "/etc/keysteward/proxy.toml"


@app.command()
def serve(
    config: ConfigOpt = DEFAULT_CONFIG,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug, info, warning, error (default: the config's).")
    ] = None,
) -> None:
    """Serve the configured exports until SIGTERM/SIGINT; SIGHUP reloads the export list."""
    from keysteward.proxy.config import LOG_LEVELS
    from keysteward.proxy.service import serve as run

    if log_level is not None and log_level not in LOG_LEVELS:
        raise KeystewardError(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}", code="proxy_option")
    raise typer.Exit(run(config, log_level=log_level))


@app.command()
def status(
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The running proxy's exports: served or locked, why, lease expiry (from the status file its config names)."""
    from keysteward.daemon_status import read_status, status_lines
    from keysteward.proxy.config import load_config

    loaded = load_config(config, check=False)
    if not loaded.status_file:
        raise KeystewardError(f"{loaded.source} names no status_file", code="status_unavailable")
    data = read_status(loaded.status_file, "proxy")
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(status_lines(data, "proxy", "exports"))


@app.command()
def check(
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Validate the config and the files it names; open nothing."""
    from keysteward.proxy.config import load_config

    loaded = load_config(config)
    summary: dict[str, Any] = {
        "config": loaded.source,
        "listen": f"{loaded.listen_address}:{loaded.listen_port}",
        "tls": loaded.tls is not None,
        "allow_plaintext": loaded.allow_plaintext,
        "metrics": f"{loaded.metrics_address}:{loaded.metrics_port}" if loaded.metrics_port is not None else None,
        "exports": [
            {
                "name": e.name,
                "path": e.path,
                "read_only": e.read_only,
                "source": "kms" if e.kms else "passphrase_file",
                "clients": list(e.clients),
            }
            for e in loaded.exports
        ],
    }
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    names = ", ".join(f"{e['name']} ({e['source']}{', ro' if e['read_only'] else ''})" for e in summary["exports"])
    sys.stdout.write(
        f"{loaded.source}: ok: listen {summary['listen']} {'tls' if summary['tls'] else 'plaintext'}; "
        f"{len(loaded.exports)} export(s){': ' + names if names else ''}\n"
    )
