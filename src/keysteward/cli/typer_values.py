"""Option helpers the typer groups share: an option's old (hidden) spelling, and the values of
:mod:`keysteward.cli.values` turned into click's usage errors (exit 2, the option named)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

import typer

from keysteward.cli.values import ValueProblem, parse_duration, parse_labels, parse_since

T = TypeVar("T")


def renamed(ctx: typer.Context, param: str, value: T, old: T | None, new_flag: str, old_flag: str) -> T:
    """The value of ``param`` given as ``new_flag`` or as its old spelling ``old_flag`` (a hidden option);
    both on the command line is a mistake."""
    if old is None:
        return value
    source = ctx.get_parameter_source(param)
    if source is not None and source.name == "COMMANDLINE":
        raise typer.BadParameter(f"give {new_flag} or its old spelling {old_flag}, not both", param_hint=new_flag)
    return old


def labels_option(items: Sequence[str], option: str = "--label") -> dict[str, str]:
    try:
        return parse_labels(items, option)
    except ValueProblem as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def duration_option(text: str, option: str) -> int:
    try:
        return parse_duration(text, option)
    except ValueProblem as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def since_option(text: str, option: str = "--since") -> datetime:
    try:
        return parse_since(text, option)
    except ValueProblem as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
