"""``keysteward agent unlock``'s own parser (keysteward.cli.agent_unlock_cmd): the options of the typer command
it stands in for at boot, their environment variables, and one line for every mistake, before any volume
is read or any key manager asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keysteward.cli import agent_unlock_cmd
from keysteward.cli.volume_args import HelpRequested, UsageError, parse_verb

pytestmark = pytest.mark.unit


def parse(*args: str) -> dict[str, object]:
    return parse_verb(agent_unlock_cmd.PROG, agent_unlock_cmd.VERB, list(args))


def test_values_defaults_aliases_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEYSTEWARD_URL", "KEYSTEWARD_CA_FILE", "KEYSTEWARD_METADATA_URL"):
        monkeypatch.delenv(name, raising=False)
    values = parse("a.img", "b.img", "--json")
    assert values == {
        "name": None, "url": None, "identity": "aws-iid", "metadata": None, "audience": None, "suite": "x25519",
        "ca_file": None, "mode": "auto", "tpm": None, "tpm_pcrs": "sha256:0,7", "snp": None, "wait_approval": "0",
        "json": True, "paths": ["a.img", "b.img"],
    }  # fmt: skip
    assert parse("--kms", "https://old:8443", "v")["url"] == "https://old:8443"  # the old spelling still works
    monkeypatch.setenv("KEYSTEWARD_URL", "https://env:8443")
    monkeypatch.setenv("KEYSTEWARD_CA_FILE", "ca.pem")
    monkeypatch.setenv("KEYSTEWARD_METADATA_URL", "http://md")
    values = parse("v", "--url=https://flag:8443")
    assert (values["url"], values["ca_file"], values["metadata"]) == ("https://flag:8443", "ca.pem", "http://md")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "Missing argument 'PATH'."),
        (("v", "--nope"), "No such option: --nope"),
        (("v", "--json=yes"), "does not take a value"),
        (("v", "--mode"), "requires an argument"),
    ],
)
def test_command_line_mistakes(args: tuple[str, ...], words: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse(*args)
    assert words in caught.value.message and caught.value.where == "keysteward agent unlock"


def test_help_shows_the_documented_names_only() -> None:
    with pytest.raises(HelpRequested) as caught:
        parse("v", "--help")
    text = caught.value.text
    assert text.startswith("Usage: keysteward agent unlock [OPTIONS] PATH...")
    for flag in ("--name", "--url", "--identity", "--metadata", "--audience", "--suite", "--ca-file", "--mode",
                 "--tpm", "--tpm-pcrs", "--snp", "--wait-approval", "--json"):  # fmt: skip
        assert flag in text, flag
    assert "--kms" not in text


@pytest.mark.parametrize(
    ("args", "status", "words"),
    [
        (["v", "--wait-approval", "soon"], 2, "'--wait-approval'"),
        (["v", "--mode", "kernel"], 1, "(agent_option)"),
        (["a", "b", "--name", "data"], 1, "--name takes one PATH only (agent_option)"),
        (["v", "--identity", "tpm2"], 1, "(agent_option)"),
    ],
)
def test_bad_values_are_one_line_and_touch_nothing(
    args: list[str], status: int, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent_unlock_cmd.main(args) == status
    out, err = capsys.readouterr()
    assert out == "" and words in err and len(err.strip().splitlines()) == 1, err


def test_a_volume_that_is_not_there_fails_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing, junk = tmp_path / "missing.img", tmp_path / "junk.img"
    junk.write_bytes(b"not a LUKS header" * 512)
    assert agent_unlock_cmd.main([str(missing), str(junk), "--url", "https://127.0.0.1:9"]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 2 and lines[0].startswith(f"{missing}: ") and lines[1].startswith(f"{junk}: ")


def test_the_boot_path_imports_no_cli_or_http_framework() -> None:
    """What `keysteward agent unlock` loads before it asks the key manager: no typer, click, rich, pydantic,
    httpx, SQLAlchemy or FastAPI (the boot figure, docs/agent.md)."""
    probe = (
        "import sys\n"
        "from keysteward.cli import agent_unlock_cmd, main\n"
        "from keysteward.agent import unlock, evidence\n"
        "from keysteward.agent.client import AgentClient\n"
        "AgentClient('https://127.0.0.1:9', one_shot=True).close()\n"
        "heavy = ('typer', 'click', 'rich', 'pydantic', 'httpx', 'httpcore', 'sqlalchemy', 'fastapi', 'cedarpy')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]", done.stdout
