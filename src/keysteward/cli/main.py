"""The ``keysteward`` command: ``keysteward <group> <verb>``.

Start-up is lazy. ``keysteward volume ...`` never imports typer: its own small parser
(:mod:`keysteward.cli.volume_cmd`) runs at once, so a ``volume read`` of a cached 1 GiB volume is not
dominated by start-up. Every other group builds the full typer app (every group, the HTTP client, the
server's schemas) when it is needed; ``keysteward --help`` still lists every group, ``volume`` included.
Errors, usage errors included, leave as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

if TYPE_CHECKING:
    import typer

VOLUME = "volume"
"""The group that runs without typer (see :mod:`keysteward.cli.volume_cmd`)."""
AGENT = "agent"
"""The group that runs without the rest of the app (boot unlock)."""


def _import_typer() -> None:
    """Import typer into this module's globals (the annotations of :func:`root` name it)."""
    global typer
    was_enabled = gc.isenabled()
    gc.disable()  # importing typer makes many long-lived objects: collecting them now is wasted start-up time
    try:
        import typer.main
    finally:
        if was_enabled:
            gc.enable()


@functools.cache
def build_app() -> typer.Typer:
    """The whole CLI, every group registered (imports them all)."""
    _import_typer()
    from keysteward.cli import (
        audit_cmd,
        backup_cmd,
        ca_cmd,
        crypto_cmd,
        devcloud_cmd,
        key_cmd,
        kmip_cmd,
        server_cmd,
        tenant_cmd,
        volume_cmd,
    )

    app = typer.Typer(
        name="keysteward",
        help="A key manager a cloud tenant runs for itself.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=True,  # keysteward --install-completion [bash|zsh|fish]
        context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every group and command
    )
    app.add_typer(server_cmd.app, name="server")
    app.add_typer(tenant_cmd.tenant_app, name="tenant")
    app.add_typer(tenant_cmd.token_app, name="token")
    app.add_typer(key_cmd.key_app, name="key")
    app.add_typer(key_cmd.dek_app, name="data-key")
    app.add_typer(crypto_cmd.app, name="crypto")
    app.add_typer(ca_cmd.app, name="ca")
    app.add_typer(kmip_cmd.app, name="kmip")
    app.add_typer(audit_cmd.app, name="audit")
    app.add_typer(backup_cmd.app, name="backup")
    app.command(
        VOLUME,
        help=volume_cmd.ABOUT,
        add_help_option=False,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False},
    )(_volume)
    app.add_typer(devcloud_cmd.app, name="devcloud")
    from keysteward.cli import release_cmd

    app.add_typer(release_cmd.provider_app, name="provider")
    app.add_typer(release_cmd.instance_app, name="instance")
    app.add_typer(release_cmd.lease_app, name="lease")
    from keysteward.cli import policy_cmd

    app.add_typer(policy_cmd.policy_app, name="policy")
    app.add_typer(policy_cmd.approvals_app, name="approvals")
    from keysteward.cli import agent_cmd

    app.add_typer(agent_cmd.app, name="agent")
    from keysteward.cli import proxy_cmd

    app.add_typer(proxy_cmd.app, name="proxy")
    from keysteward.cli import xks_cmd

    app.add_typer(xks_cmd.app, name="xks")
    from keysteward.cli import host_cmd, vm_cmd

    app.add_typer(vm_cmd.app, name="vm")
    app.add_typer(host_cmd.app, name="host")
    app.command("whoami")(tenant_cmd.whoami)

    app.callback()(root)
    return app


def _volume(ctx: typer.Context) -> int:
    """After global options (``keysteward --url U volume ...``): the volume group's own parser runs."""
    from keysteward.cli import volume_cmd

    return volume_cmd.main(list(ctx.args))


def _version(value: bool) -> None:
    if value:
        from keysteward import __version__

        sys.stdout.write(f"keysteward {__version__}\n")
        raise typer.Exit()


def root(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", "--kms", envvar="KEYSTEWARD_URL", help="Key manager URL, or several: URL,URL (tried in turn)."
        ),
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_TOKEN", help="API token.", show_default=False)] = None,
    ca_file: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_CA_FILE", help="CA that signed the server.")] = None,
    cert: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_CLIENT_CERT", help="Client certificate (PEM).")] = None,
    key: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_CLIENT_KEY", help="Client key (PEM).")] = None,
    data_dir: Annotated[str | None, typer.Option(envvar="KEYSTEWARD_DATA_DIR", hidden=True)] = None,
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    from keysteward.cli.client import ClientOptions
    from keysteward.cli.context import CliState

    ctx.obj = CliState(ClientOptions.resolve(url, token, ca_file, cert, key, data_dir))


def __getattr__(name: str) -> Any:
    if name == "app":  # `keysteward.cli.main.app`, as before the start-up became lazy
        return build_app()
    raise AttributeError(name)


def _fail(message: str, code: int = 1) -> None:
    from keysteward.cli.output import fail

    fail(message, code)


def _click_exceptions() -> Any:
    """Click's exception classes: vendored in recent typer, the click package in older ones."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - typer < 0.20 depends on click itself
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


def _run(command: Any, args: list[str], prog_name: str) -> None:
    """Run a click command and turn every outcome into an exit status; errors into one line."""
    errors = _click_exceptions()
    try:
        status = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except errors.NoArgsIsHelpError as exc:  # `keysteward` or a group without a verb: its help
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else prog_name
        _fail(f"{exc.format_message()} (see {where} --help)", exc.exit_code)
    except errors.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except (typer.Abort, EOFError):
        _fail("aborted")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(status if isinstance(status, int) else 0)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == [VOLUME]:
        gc.disable()  # start-up only makes long-lived objects; volume_cmd turns it back on to run the verb
        from keysteward.cli import volume_cmd

        status = volume_cmd.main(args[1:])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # skip the interpreter's teardown: the verb has flushed and closed what it wrote
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from keysteward.errors import KeystewardError

    gc.disable()  # until the command runs: start-up only makes long-lived objects
    try:
        if args[:1] == [AGENT]:  # at boot every 100 ms counts: the agent group alone, not every group
            _import_typer()
            from keysteward.cli import agent_cmd

            command, args, prog = typer.main.get_command(agent_cmd.app), args[1:], "keysteward agent"
        else:
            app = build_app()  # imports typer
            command, prog = typer.main.get_command(app), "keysteward"
        gc.enable()
        _run(command, args, prog)
    except KeystewardError as exc:
        _fail(f"{exc.message} ({exc.code})")
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "))


if __name__ == "__main__":
    main()
