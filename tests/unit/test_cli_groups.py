"""The CLI's lazy start-up: which group a command line invokes, and that each group alone is the same CLI."""

from __future__ import annotations

import pytest

from keysteward.cli import main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("args", "group"),
    [
        (["vm", "start", "web"], "vm"),
        (["--url", "https://a:8443", "vm", "list"], "vm"),
        (["--url=https://a:8443", "--token", "t", "key", "list"], "key"),
        (["--ca-file", "ca.pem", "--cert", "c", "--key", "k", "host", "status"], "host"),
        (["--kms", "https://a", "whoami"], "whoami"),
        (["volume", "dump", "x"], "volume"),
        ([], None),
        (["--help"], None),
        (["-h", "vm"], None),
        (["--version"], None),
        (["--install-completion"], None),
        (["--url"], None),  # the value is missing: the full app says so
        (["no-such-group"], None),
        (["--token", "vm", "list"], "list" if "list" in main.GROUPS else None),  # "vm" is the token's value
    ],
)
def test_group_of(args: list[str], group: str | None) -> None:
    assert main._group_of(args) == group


def test_each_group_alone_has_the_same_commands_as_in_the_whole_app() -> None:
    import typer.main

    whole = typer.main.get_command(main.build_app())
    assert set(whole.commands) == set(main.GROUPS)  # type: ignore[attr-defined]
    for name in main.GROUPS:
        alone = typer.main.get_command(main.build_app(name))
        assert set(alone.commands) == {name}  # type: ignore[attr-defined]
        sub, full = alone.commands[name], whole.commands[name]  # type: ignore[attr-defined]
        assert set(getattr(sub, "commands", {})) == set(getattr(full, "commands", {}))
        assert [p.name for p in alone.params] == [p.name for p in whole.params]  # the global options too
