"""A small command-line parser for ``keysteward volume``: click's rules and messages, none of its start-up.

``keysteward volume read`` of a cached 1 GiB volume takes about as long as building the typer app
would, so the volume group does not build one. This parser follows the same rules as click for what
the group uses (long options with a value or as flags, ``--opt=value``, options and the one PATH
argument in any order, ``--`` ends options, the last repeat of an option wins, ``--help`` anywhere
wins over other mistakes) and reports mistakes with click's words, so the command line behaves as it
did when the group was a typer app. It imports nothing beyond the standard library's core.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from keysteward.errors import KeystewardError

WIDTH = 80
INT_ERROR = "Input should be a valid integer, unable to parse string as an integer"


class UsageError(Exception):
    """A mistake on the command line: ``message`` and the command whose ``--help`` explains it."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.message = message
        self.where = where


class HelpRequested(Exception):
    """``--help`` was given (or a group without a verb): ``text`` goes to stdout with ``status``."""

    def __init__(self, text: str, status: int = 0) -> None:
        super().__init__(text)
        self.text = text
        self.status = status


class Opt(NamedTuple):
    """A long option: ``kind`` is ``str``, ``int``, ``flag`` or ``multi`` (repeatable, a list of strings);
    ``default`` is what is used without it; ``aliases`` are older spellings, accepted but not shown in help."""

    name: str
    kind: str = "str"
    help: str = ""
    metavar: str = ""
    required: bool = False
    default: Any = None
    envvar: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def label(self) -> str:
        if self.kind == "flag":
            return self.name
        return f"{self.name} {self.metavar or ('INTEGER' if self.kind == 'int' else 'TEXT')}"

    def notes(self) -> str:
        extra = [f"[env var: {self.envvar}]"] if self.envvar else []
        if self.required:
            extra.append("[required]")
        elif self.kind == "int" and self.default is not None:
            extra.append(f"[default: {self.default}]")
        return " ".join([self.help, *extra]).strip()


class Verb(NamedTuple):
    """A command: its options, its PATH argument (described by ``path_help``), and what runs it."""

    name: str
    help: str
    options: tuple[Opt, ...]
    run: Callable[[dict[str, Any]], int | None]
    path_help: str = "Volume: a file or block device."
    many: bool = False
    """One PATH or more (``PATH...``, in ``values["paths"]``) instead of exactly one."""


HELP = Opt("--help", "flag", "Show this message and exit.")


def _wrap(text: str, indent: int, width: int = WIDTH) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and indent + len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def _table(rows: Sequence[tuple[str, str]]) -> list[str]:
    column = min(max(len(left) for left, _ in rows) + 4, 30)
    out: list[str] = []
    for left, right in rows:
        text = _wrap(right, column) or [""]
        if len(left) + 4 > column:
            out.append(f"  {left}")
            out.extend(" " * column + part for part in text)
        else:
            out.append(f"  {left.ljust(column - 2)}{text[0]}".rstrip())
            out.extend(" " * column + part for part in text[1:])
    return out


def _page(usage: str, about: str, sections: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> str:
    lines = [f"Usage: {usage}", "", *("  " + part for part in _wrap(about, 2))]
    for title, rows in sections:
        if rows:
            lines += ["", f"{title}:", *_table(rows)]
    return "\n".join(lines) + "\n"


def verb_help(prog: str, verb: Verb) -> str:
    return _page(
        f"{prog} {verb.name} [OPTIONS]" + ((" PATH..." if verb.many else " PATH") if verb.path_help else ""),
        verb.help,
        [
            (
                "Arguments",
                [("PATH" + ("..." if verb.many else ""), f"{verb.path_help} [required]")] if verb.path_help else [],
            ),
            ("Options", [(opt.label(), opt.notes()) for opt in (*verb.options, HELP)]),
        ],
    )


def group_help(prog: str, about: str, options: Sequence[Opt], verbs: Sequence[Verb]) -> str:
    return _page(
        f"{prog} [OPTIONS] COMMAND [ARGS]...",
        about,
        [
            ("Options", [(opt.label(), opt.notes()) for opt in (*options, HELP)]),
            ("Commands", [(verb.name, verb.help) for verb in verbs]),
        ],
    )


def _no_such_option(name: str, known: Sequence[str], where: str) -> UsageError:
    from difflib import get_close_matches  # only for the error

    close = get_close_matches(name, known)
    hint = f" (Possible options: {', '.join(sorted(close))})" if close else ""
    return UsageError(f"No such option: {name}{hint}", where)


def _scan(
    args: Sequence[str], options: Sequence[Opt], where: str, *, stop_at_word: bool
) -> tuple[dict[str, str | bool | list[str]], list[str], bool, list[str]]:
    """Split ``args`` into option values, words, whether ``--help`` came, and what follows the first word
    (``stop_at_word``: a group stops at its verb)."""
    by_name = {opt.name: opt for opt in options}
    by_alias = {alias: opt for opt in options for alias in opt.aliases}
    given: dict[str, str | bool | list[str]] = {}
    words: list[str] = []
    wants_help = False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            words.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            words.append(arg)
            if stop_at_word:
                return given, words, wants_help, list(args[i:])
            continue
        name, eq, value = arg.partition("=")
        if name in (HELP.name, "-h") and not eq:
            wants_help = True
            continue
        opt = by_name.get(name) or by_alias.get(name)
        if opt is None:
            raise _no_such_option(name, [*by_name, HELP.name], where)
        if opt.kind == "flag":
            if eq:
                raise UsageError(f"Option '{name}' does not take a value.", where)
            given[opt.dest] = True
        elif opt.kind == "multi" and (eq or i < len(args)):
            given.setdefault(opt.dest, [])
            given[opt.dest].append(value if eq else args[i])  # type: ignore[union-attr]
            i += 0 if eq else 1
        elif eq:
            given[opt.dest] = value
        elif i < len(args):
            given[opt.dest] = args[i]
            i += 1
        else:
            raise UsageError(f"Option '{name}' requires an argument.", where)
    return given, words, wants_help, []


def _values(options: Sequence[Opt], given: dict[str, str | bool | list[str]], where: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for opt in options:
        raw = given.get(opt.dest)
        if raw is None and opt.envvar:
            raw = os.environ.get(opt.envvar) or None
        if raw is None:
            if opt.required:
                raise UsageError(f"Missing option '{opt.name}'.", where)
            values[opt.dest] = False if opt.kind == "flag" else [] if opt.kind == "multi" else opt.default
        elif opt.kind == "int":
            try:
                values[opt.dest] = int(str(raw))
            except ValueError:
                raise UsageError(f"Invalid value for '{opt.name}': {INT_ERROR}", where) from None
        else:
            values[opt.dest] = raw
    return values


def parse_verb(prog: str, verb: Verb, args: Sequence[str]) -> dict[str, Any]:
    """The values of ``verb``'s options and its ``path``; raises :class:`UsageError` or :class:`HelpRequested`."""
    where = f"{prog} {verb.name}"
    given, words, wants_help, _ = _scan(args, verb.options, where, stop_at_word=False)
    if wants_help:
        raise HelpRequested(verb_help(prog, verb))
    if not verb.path_help:  # a verb without PATH
        if words:
            raise UsageError(f"Got unexpected extra argument(s) ({' '.join(words)})", where)
        return {**_values(verb.options, given, where), "path": None}
    if not words:
        raise UsageError("Missing argument 'PATH'.", where)
    values = _values(verb.options, given, where)
    if verb.many:
        values["paths"] = list(words)
        return values
    if len(words) > 1:
        raise UsageError(f"Got unexpected extra argument(s) ({' '.join(words[1:])})", where)
    values["path"] = words[0]
    return values


def parse_group(
    prog: str, about: str, options: Sequence[Opt], verbs: Sequence[Verb], args: Sequence[str]
) -> tuple[dict[str, Any], Verb, dict[str, Any]]:
    """The group's option values, the verb, and the verb's values."""
    given, words, wants_help, rest = _scan(args, options, prog, stop_at_word=True)
    if wants_help or not words:
        raise HelpRequested(group_help(prog, about, options, verbs), 0 if wants_help else 2)
    verb = next((v for v in verbs if v.name == words[0]), None)
    if verb is None:
        raise UsageError(f"No such command '{words[0]}'.", prog)
    group_values = _values(options, given, prog)
    return group_values, verb, parse_verb(prog, verb, rest)


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, one line (``error:`` in red on a colour terminal)."""
    colour = sys.stderr.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    prefix = "\x1b[31merror:\x1b[0m" if colour else "error:"
    sys.stderr.write(f"{prefix} {message}\n")
    sys.stderr.flush()


def exit_status(name: str, run: Callable[[], int | None], os_error: Callable[[OSError], str]) -> int:
    """Run a parsed command ``keysteward NAME``: every outcome an exit status, every failure one line on stderr
    (``os_error`` words a file or system error), never a traceback."""
    try:
        return run() or 0
    except HelpRequested as exc:
        sys.stdout.write(exc.text)
        return exc.status
    except UsageError as exc:
        print_error(f"{exc.message} (see {exc.where} --help)")
        return 2
    except KeystewardError as exc:
        print_error(f"{exc.message} ({exc.code})")
        return 1
    except OSError as exc:
        print_error(os_error(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except EOFError:
        print_error("aborted")
        return 1
    except Exception as exc:  # a bug: still one line (its text may hold anything), the details in a debug log
        import logging

        logging.getLogger(__name__).debug("unexpected error in keysteward %s", name, exc_info=True)
        print_error(f"unexpected {type(exc).__name__} (internal_error)")
        return 1
