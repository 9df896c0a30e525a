"""The ``keysteward`` command: ``keysteward <group> <verb>``.

Start-up is lazy. ``keysteward volume ...`` never imports typer: its own small parser
(:mod:`keysteward.cli.volume_cmd`) runs at once, so a ``volume read`` of a cached 1 GiB volume is not
dominated by start-up. ``keysteward GROUP ...`` builds the typer app with that group alone (its module
and what it imports); ``keysteward --help``, global options before the group and shell completion build
it with every group, ``volume`` included.
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


GROUPS: dict[str, tuple[str, str]] = {
    "server": ("server_cmd", "app"),
    "tenant": ("tenant_cmd", "tenant_app"),
    "token": ("tenant_cmd", "token_app"),
    "key": ("key_cmd", "key_app"),
    "data-key": ("key_cmd", "dek_app"),
    "crypto": ("crypto_cmd", "app"),
    "ca": ("ca_cmd", "app"),
    "kmip": ("kmip_cmd", "app"),
    "audit": ("audit_cmd", "app"),
    "backup": ("backup_cmd", "app"),
    VOLUME: ("volume_cmd", ""),  # a command of its own parser, not a typer group
    "devcloud": ("devcloud_cmd", "app"),
    "provider": ("release_cmd", "provider_app"),
    "instance": ("release_cmd", "instance_app"),
    "lease": ("release_cmd", "lease_app"),
    "policy": ("policy_cmd", "policy_app"),
    "approvals": ("policy_cmd", "approvals_app"),
    AGENT: ("agent_cmd", "app"),
    "proxy": ("proxy_cmd", "app"),
    "xks": ("xks_cmd", "app"),
    "vm": ("vm_cmd", "app"),
    "host": ("host_cmd", "app"),
    "whoami": ("tenant_cmd", "whoami"),  # a command
}
"""Every top-level name, in the order ``--help`` lists them: (module under keysteward.cli, attribute)."""


@functools.cache
def build_app(only: str | None = None) -> typer.Typer:
    """The CLI with every group registered, or with ``only`` that one (its module alone is imported: a
    ``keysteward vm start`` does not pay for the other twenty groups' imports)."""
    _import_typer()
    import importlib

    app = typer.Typer(
        name="keysteward",
        help="A key manager a cloud tenant runs for itself.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=True,  # keysteward --install-completion [bash|zsh|fish]
        context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every group and command
    )
    for name, (module_name, attribute) in GROUPS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(f"keysteward.cli.{module_name}")
        if name == VOLUME:
            app.command(
                VOLUME,
                help=module.ABOUT,
                add_help_option=False,
                context_settings={
                    "allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False
                },
            )(_volume)  # fmt: skip
        elif name == "whoami":
            app.command(name)(getattr(module, attribute))
        else:
            app.add_typer(getattr(module, attribute), name=name)
    app.callback()(root)
    return app


_ROOT_VALUE_OPTIONS = frozenset({"--url", "--kms", "--token", "--ca-file", "--cert", "--key", "--data-dir"})
"""The options of :func:`root` that take a value (``keysteward --url U vm start`` is the ``vm`` group)."""


def _group_of(args: list[str]) -> str | None:
    """The top-level name ``args`` invoke after the global options, or None (help, completion, unknown)."""
    at = 0
    while at < len(args):
        arg = args[at]
        if arg in _ROOT_VALUE_OPTIONS:
            at += 2
        elif arg.startswith("--") and arg.split("=", 1)[0] in _ROOT_VALUE_OPTIONS:
            at += 1
        elif arg.startswith("-"):
            return None
        else:
            return arg if arg in GROUPS else None
    return None


GLOBAL_ENV = {"url": "KEYSTEWARD_URL", "ca_file": "KEYSTEWARD_CA_FILE", "token": "KEYSTEWARD_TOKEN"}
"""The global options the ``volume`` group reads from its environment variables."""


def _volume(ctx: typer.Context) -> int:
    """After global options (``keysteward --url U volume ...``): the volume group's own parser runs, the
    global options given standing in for their environment variables (the verb's own options win)."""
    from keysteward.cli import volume_cmd

    given = getattr(ctx.obj, "given", None) or {}
    for name, variable in GLOBAL_ENV.items():
        if given.get(name):
            os.environ[variable] = given[name]
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
        typer.Option("--url", envvar="KEYSTEWARD_URL", help="Key manager URL, or several: URL,URL (tried in turn)."),
    ] = None,
    kms: Annotated[str | None, typer.Option("--kms", hidden=True, help="Old spelling of --url.")] = None,
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
    from keysteward.cli.typer_values import renamed

    url = renamed(ctx, "url", url, kms, "--url", "--kms")
    given = {"url": url, "ca_file": ca_file, "token": token}
    ctx.obj = CliState(ClientOptions.resolve(url, token, ca_file, cert, key, data_dir), given)


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
    if args[:2] == [AGENT, "unlock"]:  # at boot every millisecond counts: no typer, no other group
        from keysteward.cli import agent_unlock_cmd

        status = agent_unlock_cmd.main(args[2:])
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(status)
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
            app = build_app(_group_of(args))  # imports typer
            command, prog = typer.main.get_command(app), "keysteward"
        gc.enable()
        _run(command, args, prog)
    except KeystewardError as exc:
        _fail(f"{exc.message} ({exc.code})")
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "))


if __name__ == "__main__":
    main()
