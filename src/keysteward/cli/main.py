"""The ``keysteward`` command: ``keysteward <group> <verb>``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from keysteward.cli import audit_cmd, ca_cmd, crypto_cmd, key_cmd, server_cmd, tenant_cmd
from keysteward.cli.client import ClientOptions
from keysteward.cli.context import CliState
from keysteward.cli.output import fail
from keysteward.errors import KeystewardError

app = typer.Typer(
    name="keysteward",
    help="A key manager a cloud tenant runs for itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(server_cmd.app, name="server")
app.add_typer(tenant_cmd.tenant_app, name="tenant")
app.add_typer(tenant_cmd.token_app, name="token")
app.add_typer(key_cmd.key_app, name="key")
app.add_typer(key_cmd.dek_app, name="data-key")
app.add_typer(crypto_cmd.app, name="crypto")
app.add_typer(ca_cmd.app, name="ca")
app.add_typer(audit_cmd.app, name="audit")
app.command("whoami")(tenant_cmd.whoami)


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_URL", help="Key manager URL.")] = None,
    token: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_TOKEN", help="API token.", show_default=False)] = None,
    ca_file: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_CA_FILE", help="CA that signed the server.")] = None,
    cert: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_CLIENT_CERT", help="Client certificate (PEM).")] = None,
    key: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_CLIENT_KEY", help="Client key (PEM).")] = None,
    data_dir: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_DATA_DIR", hidden=True)] = None,
) -> None:
    ctx.obj = CliState(ClientOptions.resolve(url, token, ca_file, cert, key, data_dir))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeystewardError as exc:
        fail(f"{exc.message} ({exc.code})")
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "))


if __name__ == "__main__":
    main()
