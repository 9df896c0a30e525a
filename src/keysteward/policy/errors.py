"""Policy errors, and where in the source text they are.

    BadRequest
    ├── PolicyInvalid          400  a policy set that does not parse or does not validate against the schema
    │   └── PolicyTooLarge     413  over the size caps (bytes per set, policies per set)
    └── PolicyRequestInvalid   400  facts for a decision (or a dry run file) that are missing or mistyped

Cedar (through cedarpy) reports parse errors without a position and schema errors per policy only, yet an
operator must see ``file:line:column: message``. So the source is cut here into tokens and policies (a
policy ends at its ``;``, which Cedar allows nowhere else outside strings), and the position is found:

- a syntax error: Cedar's parser is LR, so every prefix of the policy before the bad token parses as far
  as "unexpected end of input", and every prefix that includes it fails with another error; a binary
  search over token boundaries finds that token in a handful of parses;
- anything else (an unknown function, a schema type error): the names the message quotes in backticks
  are looked up in the culprit condition (see :mod:`keysteward.policy.engine`), else the policy's start.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import cedarpy

from keysteward.errors import BadRequest
from keysteward.policy.schema import cedar_schema

_EOF: Final = "unexpected end of input"
_TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<comment>//[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*(?:"|\Z))
    | (?P<word>\??[A-Za-z_][A-Za-z0-9_]*)
    | (?P<number>[0-9]+)
    | (?P<op>::|==|!=|<=|>=|&&|\|\|)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_QUOTED = re.compile(r"`([^`]{1,80})`")
_CEDAR_ID = re.compile(r"policy\d+")


class PolicyInvalid(BadRequest):
    """A policy set that cannot be compiled; ``problems`` holds every ``file:line:column: message`` found."""

    code = "policy_invalid"
    status = 400
    title = "Invalid policy"

    def __init__(self, message: str, *, code: str | None = None, problems: Sequence[str] = ()) -> None:
        self.problems: tuple[str, ...] = tuple(problems) or (message,)
        super().__init__(message, code=code)

    @classmethod
    def of(cls, problems: Sequence[str]) -> PolicyInvalid:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return cls(problems[0] + more, problems=problems)

    def diagnostics(self) -> str:
        return "\n".join(f"{self.code}: {problem}" for problem in self.problems)


class PolicyTooLarge(PolicyInvalid):
    code = "policy_too_large"
    status = 413
    title = "Policy set too large"


class PolicyRequestInvalid(BadRequest):
    """Request facts that are missing or of the wrong type; the message names the field path."""

    code = "bad_policy_request"
    title = "Invalid policy request"


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class PolicySpan:
    """One policy of a file: its tokens (comments and blanks left out) and where its text starts and ends."""

    tokens: tuple[Token, ...]
    start: int
    end: int


def tokenize(text: str) -> list[Token]:
    """Cedar's tokens, enough to cut policies and to point at one: strings, words, numbers, operators."""
    tokens = []
    for match in _TOKEN.finditer(text):
        if match.lastgroup not in ("ws", "comment"):
            tokens.append(Token(match.group(), match.start(), match.end()))
    return tokens


def split_policies(text: str) -> list[PolicySpan]:
    """The policies of a file, each ending with its ``;`` (a trailing piece without one is kept, to report it)."""
    spans: list[PolicySpan] = []
    current: list[Token] = []
    for token in tokenize(text):
        current.append(token)
        if token.text == ";":
            spans.append(PolicySpan(tuple(current), current[0].start, token.end))
            current = []
    if current:
        spans.append(PolicySpan(tuple(current), current[0].start, current[-1].end))
    return spans


def line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of ``offset`` in ``text``."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def where(name: str, text: str, offset: int, message: str) -> str:
    line, column = line_column(text, offset)
    return f"{name}:{line}:{column}: {message}"


def quoted_names(message: str) -> list[str]:
    """The names a Cedar message quotes in backticks, most specific first (``policy0`` ids left out)."""
    names = [name for name in _QUOTED.findall(message) if not re.fullmatch(r"policy\d+", name)]
    trailing = re.search(r": (@?[A-Za-z_][A-Za-z0-9_]*)$", message)  # "invalid variable: x"
    return names + ([trailing.group(1)] if trailing else [])


def find_quoted(tokens: Sequence[Token], message: str) -> Token | None:
    """The first token that a name quoted in ``message`` names (``foo``, ``"foo"``, ``@foo``), if any."""
    for name in quoted_names(message):
        bare = name.lstrip("@").strip('"')
        for token in tokens:
            if token.text == bare or token.text.strip('"') == bare:
                return token
    return None


def syntax_error_at(text: str, span: PolicySpan, parse: Callable[[str], str | None]) -> tuple[int, str]:
    """Where the policy ``span`` of ``text`` fails to parse, and Cedar's message.

    ``parse`` returns None when the text parses, else Cedar's message. The last token whose prefix still
    reads as "unexpected end of input" is followed by the culprit (see the module docstring).
    """
    tokens = span.tokens
    message = parse(text[span.start : span.end]) or "does not parse"
    if message == _EOF:  # only a policy without its closing `;` ends too early as a whole
        return span.end, "unexpected end of input (a policy ends with `;`)"
    low, high = 0, len(tokens) - 1  # invariant: the prefix through tokens[high] fails with a non-EOF error
    while low < high:
        middle = (low + high) // 2
        if parse(text[span.start : tokens[middle].end]) in (None, _EOF):
            low = middle + 1
        else:
            high = middle
    unexpected = re.fullmatch(r"unexpected token `(.+)`", message)
    if unexpected:  # the parser recovers past a bad token and may only complain a token or two later
        culprit = next((t for t in reversed(tokens[: high + 1]) if t.text == unexpected.group(1)), tokens[high])
        return culprit.start, message
    if high < len(tokens) - 1 or message.startswith("invalid token"):
        return tokens[high].start, message
    found = find_quoted(tokens, message)  # not a syntax error: a semantic one found once the policy is whole
    return (found.start if found else span.start), message


def schema_error_at(text: str, span: PolicySpan, message: str) -> int:
    """Where in the policy a schema error is: the first condition whose prefix of the policy shows it."""
    tokens = span.tokens
    effect = next(
        (i for i, t in enumerate(tokens) if t.text in ("permit", "forbid") and (i == 0 or tokens[i - 1].text != "@")), 0
    )
    clauses = _clauses(tokens, effect)
    wanted = _CEDAR_ID.sub("P", message)
    if clauses:
        head = text[tokens[effect].start : tokens[clauses[0][1]].start]
        flat = [(c, unit) for c, (_, _, units) in enumerate(clauses) for unit in units][:64]
        for count in range(1, len(flat) + 1):
            body = []
            for c, (kind, _, _) in enumerate(clauses[: flat[count - 1][0] + 1]):
                chosen = [text[u[0].start : u[-1].end] for cc, u in flat[:count] if cc == c]
                body.append(f"{kind} {{ {' && '.join(chosen)} }}")
            found = cedarpy.validate_policies(f"{head} {' '.join(body)};", cedar_schema())
            if any(_CEDAR_ID.sub("P", e.error) == wanted for e in found.errors):
                unit = flat[count - 1][1]
                hit = find_quoted(unit, message)
                return (hit or unit[0]).start
    hit = find_quoted(tokens, message)
    return (hit or tokens[effect]).start


def _clauses(tokens: Sequence[Token], effect: int) -> list[tuple[str, int, list[Sequence[Token]]]]:
    """The ``when``/``unless`` clauses after the scope: (kind, keyword index, the body cut at top-level ``&&``)."""
    clauses = []
    depth, i = 0, effect
    while i < len(tokens):
        text = tokens[i].text
        if depth == 0 and text in ("when", "unless") and i + 1 < len(tokens) and tokens[i + 1].text == "{":
            close, inner, units, start = i + 2, 0, [], i + 2
            split = True
            while close < len(tokens) and not (inner == 0 and tokens[close].text == "}"):
                t = tokens[close].text
                inner += (t in "([{") - (t in ")]}") if len(t) == 1 else 0
                if inner == 0 and t in ("||", "if"):
                    split = False
                if inner == 0 and t == "&&":
                    units.append(tokens[start:close])
                    start = close + 1
                close += 1
            units.append(tokens[start:close])
            body = [u for u in units if u] if split else [tokens[i + 2 : close]]
            if body and body[0]:
                clauses.append((text, i, body))
            i = close + 1
            continue
        depth += (text in "([{") - (text in ")]}") if len(text) == 1 else 0
        i += 1
    return clauses
