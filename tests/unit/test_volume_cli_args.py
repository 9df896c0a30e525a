"""The volume group's own command-line parser (keysteward.cli.volume_args): click's rules and words.

``keysteward volume`` does not build typer at start-up; these pin that its parser still behaves as the
typer group did: the same option names, values, defaults, and the same messages for mistakes.
"""

from __future__ import annotations

import pytest

from keysteward.cli import volume_cmd
from keysteward.cli.volume_args import HelpRequested, UsageError, parse_group

pytestmark = pytest.mark.unit


def parse(*args: str) -> tuple[dict[str, object], str, dict[str, object]]:
    group, verb, values = parse_group(volume_cmd.PROG, volume_cmd.ABOUT, volume_cmd.GROUP_OPTS, volume_cmd.VERBS,
                                      list(args))  # fmt: skip
    return group, verb.name, values


def usage_error(*args: str) -> UsageError:
    with pytest.raises(UsageError) as caught:
        parse(*args)
    return caught.value


def test_values_defaults_and_forms() -> None:
    group, verb, values = parse("read", "--passphrase-file=pw", "v.img", "--offset", "-1", "--length", "1_0")
    assert verb == "read" and group == {"argon2_memory_limit": None}
    release = {
        "kms": None,
        "identity": "aws-iid",
        "metadata": None,
        "audience": None,
        "suite": "x25519",
        "ca_file": None,
    }
    assert values == {"passphrase_file": "pw", "offset": -1, "length": 10, "output": None, "path": "v.img", **release}
    _, _, values = parse("create", "v", "--size", "4M", "--kms", "https://k", "--tag", "a=1", "--tag=b=2")
    assert values["tag"] == ["a=1", "b=2"] and values["kms"] == "https://k"
    _, _, values = parse("list")
    assert values["path"] is None
    _, _, values = parse("write", "v.img", "--passphrase-file", "-", "--fsync", "--offset", "1", "--offset", "2")
    assert values["fsync"] is True and values["offset"] == 2 and values["passphrase_file"] == "-"
    _, _, values = parse("write", "v.img", "--passphrase-file", "pw")
    assert values["fsync"] is False and values["input"] is None and values["offset"] == 0
    _, _, values = parse("create", "--size", "4M", "--", "--odd-name")
    assert values["path"] == "--odd-name" and values["sector_size"] == 4096 and values["key_size"] == 512
    assert values["label"] == "" and values["luks1"] is False and values["passphrase_file"] is None
    group, _, _ = parse("--argon2-memory-limit", "8M", "check", "v", "--passphrase-file", "p", "--json")
    assert group == {"argon2_memory_limit": "8M"}


def test_environment_sets_the_group_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTEWARD_ARGON2_MEMORY_LIMIT", "16M")
    assert parse("dump", "v")[0] == {"argon2_memory_limit": "16M"}
    assert parse("--argon2-memory-limit", "1G", "dump", "v")[0] == {"argon2_memory_limit": "1G"}


@pytest.mark.parametrize(
    ("args", "message", "where"),
    [
        (["dump"], "Missing argument 'PATH'.", "keysteward volume dump"),
        (["frobnicate", "x"], "No such command 'frobnicate'.", "keysteward volume"),
        (["list", "v"], "Got unexpected extra argument(s) (v)", "keysteward volume list"),
        (["check"], "Missing argument 'PATH'.", "keysteward volume check"),
        (["read", "v", "--passphrase-file", "p", "--offset", "ten"],
         "Invalid value for '--offset': Input should be a valid integer, unable to parse string as an integer",
         "keysteward volume read"),
        (["read", "v", "--passphrase-file", "p", "--bogus"], "No such option: --bogus", "keysteward volume read"),
        (["read", "v", "--passphrase-file", "p", "--lengt", "4"],
         "No such option: --lengt (Possible options: --length)", "keysteward volume read"),
        (["read", "v", "--passphrase-file"], "Option '--passphrase-file' requires an argument.",
         "keysteward volume read"),
        (["read", "a", "b", "c", "--passphrase-file", "p"], "Got unexpected extra argument(s) (b c)",
         "keysteward volume read"),
        (["check", "v", "--passphrase-file", "p", "--json=1"], "Option '--json' does not take a value.",
         "keysteward volume check"),
        (["--json", "check"], "No such option: --json", "keysteward volume"),
        (["remove-key", "v", "--passphrase-file", "p"], "Missing option '--slot'.", "keysteward volume remove-key"),
    ],
)  # fmt: skip
def test_mistakes_in_clicks_words(args: list[str], message: str, where: str) -> None:
    error = usage_error(*args)
    assert (error.message, error.where) == (message, where)


def test_help_wins_and_lists_every_option() -> None:
    with pytest.raises(HelpRequested) as caught:
        parse("read", "--help", "extra", "--offset", "ten")
    assert caught.value.status == 0
    for text in ("Usage: keysteward volume read [OPTIONS] PATH", "--passphrase-file FILE", "[required]", "--kms URL",
                 "--offset INTEGER", "[default: 0]", "--length INTEGER", "--output FILE", "--help"):  # fmt: skip
        assert text in caught.value.text
    with pytest.raises(HelpRequested) as caught:
        parse()
    assert caught.value.status == 2, "a group without a verb shows its help and fails, as click does"
    for verb in volume_cmd.VERBS:
        assert f"  {verb.name} " in caught.value.text
    with pytest.raises(HelpRequested) as caught:
        parse("write", "v", "--help")
    assert "--fsync" in caught.value.text and "--input FILE" in caught.value.text


def test_every_verb_keeps_its_options() -> None:
    release = {"--kms", "--identity", "--metadata", "--audience", "--suite", "--ca-file"}
    admin = {"--kms", "--token", "--ca-file", "--json"}
    expected = {
        "create": {"--size", "--passphrase-file", "--sector-size", "--key-size", "--kdf", "--label", "--luks1",
                   "--force", "--pbkdf-iterations", "--pbkdf-memory", "--pbkdf-parallel", "--json", "--kms", "--key",
                   "--name", "--provider", "--bind-account", "--bind-instance", "--bind-image", "--bind-host", "--tag",
                   "--lease-seconds", "--renew-seconds", "--grace-seconds", "--token", "--ca-file"},
        "dump": {"--json"},
        "check": {"--passphrase-file", "--json", *release},
        "read": {"--passphrase-file", "--offset", "--length", "--output", *release},
        "write": {"--passphrase-file", "--offset", "--input", "--fsync", *release},
        "add-key": {"--passphrase-file", "--new-passphrase-file", "--kdf", "--slot", "--pbkdf-iterations",
                    "--pbkdf-memory", "--pbkdf-parallel", "--json"},
        "remove-key": {"--slot", "--passphrase-file", "--json"},
        "list": admin,
        "status": admin,
        "revoke": {"--shred", "--reason", "--yes", *admin},
        "destroy": {"--reason", "--yes", *admin},
    }  # fmt: skip
    assert {verb.name: {opt.name for opt in verb.options} for verb in volume_cmd.VERBS} == expected
