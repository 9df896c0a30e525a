"""The fenced blocks of a Markdown doc, for the doc test (tests/e2e/test_docs.py).

The convention (docs/cli.md, "Docs that run"): a block fenced as ```sh or ```bash is what a user runs;
any other kind (```console, ```text, ```toml, ```cedar, ```json, ...) is an illustration. Every fence
names its kind, and a command is never left in an indented block, so no block is ambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUNNABLE = frozenset({"sh", "bash"})
# Kinds that read as "run this" but would be skipped: say which one is meant.
AMBIGUOUS = frozenset({"shell", "zsh", "shell-session", "shellsession", "bash-session", "terminal"})
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")
# A shell command in an indented (unfenced) block: four spaces or more, then a keysteward call.
_INDENTED_COMMAND = re.compile(r"^(?: {4,}|\t)(?:\$ )?(?:[A-Z_]+=\S*\s+)*keysteward\s")


@dataclass(frozen=True)
class Block:
    kind: str  # the fence's info word: sh, bash, console, text, toml, ...
    heading: str  # the nearest heading above the block ("" before the first)
    line: int  # 1-based line of the opening fence
    code: str  # the block's text, the fence's indentation removed

    @property
    def runnable(self) -> bool:
        return self.kind in RUNNABLE


class DocFormatError(ValueError):
    """A doc the test cannot read without guessing: every problem, one per line, as file:line: message."""


def parse(text: str, name: str = "<doc>") -> list[Block]:
    """The fenced blocks of ``text`` in order; raises DocFormatError listing every ambiguous spot."""
    blocks: list[Block] = []
    problems: list[str] = []
    heading = ""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is not None and fence["fence"][0] == "`" and "`" in fence["info"]:
            fence = None  # CommonMark: a backtick fence's info has no backtick; this is inline code
        if fence is None:
            title = _HEADING.match(line)
            if title is not None:
                heading = title["title"]
            elif _INDENTED_COMMAND.match(line):
                problems.append(f"{name}:{i + 1}: a command in an indented block: fence it as ```sh or ```console")
            i += 1
            continue
        indent, marker, info = fence["indent"], fence["fence"], fence["info"].strip()
        kind = info.split()[0] if info else ""
        if not kind:
            problems.append(f"{name}:{i + 1}: a fence without a kind: ```sh runs, ```console or ```text does not")
        elif kind in AMBIGUOUS:
            problems.append(f"{name}:{i + 1}: ```{kind} is ambiguous: ```sh runs, ```console does not")
        body: list[str] = []
        j = i + 1
        closed = False
        while j < len(lines):
            candidate = lines[j]
            stripped = candidate.strip()
            if stripped.startswith(marker[0] * len(marker)) and set(stripped) == {marker[0]}:
                closed = True
                break
            body.append(candidate[len(indent) :] if candidate.startswith(indent) else candidate.lstrip())
            j += 1
        if not closed:
            problems.append(f"{name}:{i + 1}: a fence that is never closed")
            break
        blocks.append(Block(kind=kind, heading=heading, line=i + 1, code="\n".join(body) + "\n"))
        i = j + 1
    if problems:
        raise DocFormatError("\n".join(problems))
    return blocks
