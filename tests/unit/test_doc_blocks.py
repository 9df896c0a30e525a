"""The doc test's reader of fenced blocks: what runs, what is shown, and what it refuses to guess."""

from __future__ import annotations

import pytest

from tests.support.doc_blocks import DocFormatError, parse

pytestmark = pytest.mark.unit


def test_blocks_in_order_with_kind_heading_and_line() -> None:
    text = "# A\n\n```sh\necho 1\n```\n\n## B\n\n~~~console\nkeysteward x\n~~~\n\n```toml\n[a]\n```\n"
    blocks = parse(text)
    assert [(b.kind, b.heading, b.line, b.runnable) for b in blocks] == [
        ("sh", "A", 3, True),
        ("console", "B", 9, False),
        ("toml", "B", 13, False),
    ]
    assert blocks[0].code == "echo 1\n"


def test_a_fence_in_a_list_item_loses_its_indentation() -> None:
    (block,) = parse("1. step\n\n   ```bash\n   keysteward ca init\n     --x\n   ```\n")
    assert block.code == "keysteward ca init\n  --x\n"


def test_a_longer_fence_closes_only_on_as_long_a_fence() -> None:
    (block,) = parse("````sh\n```\nnot closed yet\n````\n")
    assert block.code == "```\nnot closed yet\n"


def test_inline_code_with_backticks_is_not_a_fence() -> None:
    assert parse("Every ```` ```sh ```` block\n```` ```toml ````, more\n") == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("```\nkeysteward ca init\n```\n", ":1: a fence without a kind"),
        ("Run:\n\n    keysteward server start\n", ":3: a command in an indented block"),
        ("    KEYSTEWARD_TOKEN=x keysteward whoami\n", ":1: a command in an indented block"),
        ("```sh\necho open\n", ":1: a fence that is never closed"),
        ("text\n\n```shell\nkeysteward ca init\n```\n", ":3: ```shell is ambiguous"),
        ("```sh\necho\n~~~\n", ":1: a fence that is never closed"),
    ],
)
def test_ambiguous_docs_are_refused_with_the_line(text: str, problem: str) -> None:
    with pytest.raises(DocFormatError, match=problem):
        parse(text, "doc.md")


def test_every_problem_is_listed() -> None:
    with pytest.raises(DocFormatError) as refused:
        parse("```\nx\n```\n\n    keysteward y\n", "doc.md")
    assert str(refused.value).splitlines() == [
        "doc.md:1: a fence without a kind: ```sh runs, ```console or ```text does not",
        "doc.md:5: a command in an indented block: fence it as ```sh or ```console",
    ]
