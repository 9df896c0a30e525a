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
        "url": None,
        "identity": "aws-iid",
        "metadata": None,
        "audience": None,
        "suite": "x25519",
        "ca_file": None,
    }
    assert values == {"passphrase_file": "pw", "offset": -1, "length": 10, "output": None, "path": "v.img", **release}
    _, _, values = parse("create", "v", "--size", "4M", "--url", "https://k", "--kms-label", "a=1", "--kms-label=b=2")
    assert values["kms_label"] == ["a=1", "b=2"] and values["url"] == "https://k"
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
    for text in ("Usage: keysteward volume read [OPTIONS] PATH", "--passphrase-file FILE", "[required]", "--url URL",
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
    release = {"--url", "--identity", "--metadata", "--audience", "--suite", "--ca-file"}
    admin = {"--url", "--token", "--ca-file", "--json"}
    expected = {
        "create": {"--size", "--passphrase-file", "--sector-size", "--key-size", "--pbkdf", "--label", "--luks1",
                   "--force", "--pbkdf-force-iterations", "--iter-time", "--pbkdf-memory", "--pbkdf-parallel",
                   "--json", "--url",
                   "--key-name", "--name", "--provider", "--bind-account", "--bind-instance", "--bind-image",
                   "--bind-host", "--kms-label",
                   "--lease-seconds", "--renew-seconds", "--grace-seconds", "--token", "--ca-file"},
        "dump": {"--json"},
        "check": {"--passphrase-file", "--json", *release},
        "read": {"--passphrase-file", "--offset", "--length", "--output", *release},
        "write": {"--passphrase-file", "--offset", "--input", "--fsync", *release},
        "add-key": {"--passphrase-file", "--new-passphrase-file", "--pbkdf", "--slot", "--pbkdf-force-iterations",
                    "--iter-time",
                    "--pbkdf-memory", "--pbkdf-parallel", "--json"},
        "remove-key": {"--slot", "--passphrase-file", "--json"},
        "list": admin,
        "status": admin,
        "revoke": {"--shred", "--reason", "--yes", *admin},
        "destroy": {"--reason", "--yes", *admin},
    }  # fmt: skip
    assert {verb.name: {opt.name for opt in verb.options} for verb in volume_cmd.VERBS} == expected


OLD_SPELLINGS = {
    "--kms": ("url", "https://k"),
    "--key": ("key_name", "volumes"),
    "--tag": ("kms_label", ["a=1"]),
    "--kdf": ("pbkdf", "pbkdf2"),
    "--pbkdf-iterations": ("pbkdf_force_iterations", 1000),
}
"""The flags renamed for one convention (docs/cli.md): each still works, under its new name's value."""


@pytest.mark.parametrize("old", sorted(OLD_SPELLINGS))
def test_old_spellings_still_work_but_are_not_shown(old: str) -> None:
    dest, value = OLD_SPELLINGS[old]
    given = value[0] if isinstance(value, list) else str(value)
    _, _, values = parse("create", "v", "--size", "4M", old, given)
    assert values[dest] == value
    _, _, values = parse("create", "v", "--size", "4M", f"{old}={given}")
    assert values[dest] == value
    with pytest.raises(HelpRequested) as caught:
        parse("create", "--help")
    assert f"  {old} " not in caught.value.text and f"  {old}\n" not in caught.value.text
    assert old not in usage_error("create", "v", "--size", "4M", old[:-1] + "x", "1").message.split(":")[-1]


def test_old_url_spelling_on_every_key_manager_verb() -> None:
    for verb in ("check", "read", "write", "list", "status", "revoke", "destroy"):
        args = [verb] if verb == "list" else [verb, "v"]
        _, _, values = parse(*args, "--kms", "https://old")
        assert values["url"] == "https://old", verb
        with pytest.raises(HelpRequested) as caught:
            parse(verb, "--help")
        assert "--url URL" in caught.value.text and "--kms" not in caught.value.text, verb
