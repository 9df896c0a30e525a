"""What every command gets from the root callback: how to reach the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import typer

from keysteward.cli.client import Client, ClientOptions

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@dataclass
class CliState:
    options: ClientOptions | None = None
    given: dict[str, str | None] = field(default_factory=dict)
    """The global options as given (command line or environment), before defaults: for the groups that
    do not use :class:`Client` (``volume``, ``agent``)."""

    def client(self) -> Client:
        assert self.options is not None
        return Client(self.options)


def client(ctx: typer.Context) -> Client:
    state: CliState = ctx.ensure_object(CliState)
    return state.client()
