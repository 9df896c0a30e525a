"""Help as an operator reaches for it: ``-h`` everywhere (typer groups, the agent group and the volume group
with its own parser alike), ``--version``, and shell completion to install."""

from __future__ import annotations

import subprocess

import pytest

from keysteward import __version__
from tests.fixtures.keysteward import KEYSTEWARD

pytestmark = pytest.mark.e2e


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KEYSTEWARD, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        ((), "Usage: keysteward [OPTIONS] COMMAND"),
        (("key",), "Usage: keysteward key [OPTIONS] COMMAND"),
        (("key", "create"), "Usage: keysteward key create"),
        (("agent",), "Usage: keysteward agent [OPTIONS] COMMAND"),
        (("volume",), "Usage: keysteward volume [OPTIONS] COMMAND"),
        (("volume", "create"), "Usage: keysteward volume create [OPTIONS] PATH"),
        (("instance", "list"), "Usage: keysteward instance list"),
    ],
)
def test_dash_h_is_help_everywhere(args: tuple[str, ...], usage: str) -> None:
    short, long = _run(*args, "-h"), _run(*args, "--help")
    assert short.returncode == 0 and usage in short.stdout, short.stderr
    assert short.stdout == long.stdout


def test_version_and_completion() -> None:
    version = _run("--version")
    assert version.returncode == 0 and version.stdout == f"keysteward {__version__}\n"
    completion = _run("--show-completion", "bash")
    assert completion.returncode == 0 and "_keysteward_completion" in completion.stdout
    assert "--install-completion" in _run("-h").stdout
