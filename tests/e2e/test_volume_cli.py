"""``keysteward volume`` end to end through the real CLI: the whole life of a volume, and every refusal.

Each refusal is one line on stderr, a non-zero exit, no traceback, and leaves the volume's bytes as
they were (sha256 before and after).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keysteward.volume import LuksVolume
from tests.integration.test_volume_tools import (
    CS_ARGON2_SMALL,
    KEYSTEWARD,
    MIB,
    PBKDF2_FAST,
    assert_one_line_error,
    keyfile,
    ks,
    pattern,
    run,
    sha256,
    tool,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, Path]:
    image, pw = tmp_path / "v.img", keyfile(tmp_path / "pw", b"correct horse\n")
    ks("create", image, "--size", "4M", "--passphrase-file", pw, *PBKDF2_FAST, "--label", "e2e")
    return image, pw


def test_life_of_a_volume(tmp_path: Path) -> None:
    image, pw = tmp_path / "disk.img", keyfile(tmp_path / "pw", b"first\n")
    out = ks("create", image, "--size", "8M", "--passphrase-file", pw, "--sector-size", "512", "--key-size", "256",
             *PBKDF2_FAST, "--label", "life").stdout.decode()  # fmt: skip
    assert out.startswith("created LUKS2 volume") and "8388608 bytes of payload" in out
    text = ks("dump", image).stdout.decode()
    assert "label: life" in text and "keyslot 0: pbkdf2" in text and "512-byte sectors" in text
    info = json.loads(ks("dump", image, "--json").stdout)
    assert info["payload"] == {"offset": 16 * MIB, "size": 8 * MIB} and info["keyslots"][0]["key_bits"] == 256

    data = pattern(3 * MIB + 5, 1)
    ks("write", image, "--passphrase-file", pw, "--offset", 1000, input=data)  # from stdin
    assert ks("read", image, "--passphrase-file", pw, "--offset", 1000, "--length", len(data)).stdout == data
    out_file = tmp_path / "out.bin"
    ks("read", image, "--passphrase-file", pw, "--output", out_file)
    whole = out_file.read_bytes()
    assert len(whole) == 8 * MIB and whole[1000 : 1000 + len(data)] == data
    assert out_file.stat().st_mode & 0o777 == 0o600, "decrypted output is private"

    second = keyfile(tmp_path / "second", b"second")
    assert json.loads(ks("add-key", image, "--passphrase-file", pw, "--new-passphrase-file", second, *PBKDF2_FAST,
                         "--json").stdout)["keyslot"] == 1  # fmt: skip
    assert json.loads(ks("check", image, "--passphrase-file", second, "--json").stdout)["keyslot"] == 1
    ks("remove-key", image, "--slot", 0, "--passphrase-file", second)
    assert_one_line_error(ks("check", image, "--passphrase-file", pw, check=False), "luks_wrong_passphrase")
    # the passphrase from standard input, as cryptsetup's --key-file -
    assert (
        ks("read", image, "--passphrase-file", "-", "--length", 10, "--offset", 1000, input=b"second").stdout
        == (data[:10])
    )
    assert ks("read", image, "--passphrase-file", second, "--offset", 8 * MIB).stdout == b""


def test_refusals_leave_the_volume_alone(tmp_path: Path, volume: tuple[Path, Path]) -> None:
    image, pw = volume
    wrong = keyfile(tmp_path / "wrong", b"correct horse")  # no newline: a different passphrase
    empty = keyfile(tmp_path / "empty", b"")
    big = keyfile(tmp_path / "big", bytes(4 * MIB + 1))
    small = keyfile(tmp_path / "small", b"abc")
    new = keyfile(tmp_path / "new", b"new")
    before = sha256(image)
    cases: list[tuple[list[object], str]] = [
        (["check", image, "--passphrase-file", wrong], "luks_wrong_passphrase"),
        (["read", image, "--passphrase-file", wrong], "luks_wrong_passphrase"),
        (["write", image, "--passphrase-file", wrong, "--input", small], "luks_wrong_passphrase"),
        (["add-key", image, "--passphrase-file", wrong, "--new-passphrase-file", new, *PBKDF2_FAST], "wrong_pass"),
        (["remove-key", image, "--slot", 0, "--passphrase-file", pw], "volume_last_keyslot"),
        (["remove-key", image, "--slot", 3, "--passphrase-file", pw], "not in use"),
        (["check", image, "--passphrase-file", empty], "empty"),
        (["check", image, "--passphrase-file", tmp_path / "missing"], "No such file"),
        (["check", image, "--passphrase-file", tmp_path], "directory"),
        (["check", tmp_path / "nothing.img", "--passphrase-file", pw], "volume_not_found"),
        (["check", tmp_path, "--passphrase-file", pw], "not a regular file"),
        (["read", image, "--passphrase-file", pw, "--offset", -1], "negative"),
        (["read", image, "--passphrase-file", pw, "--offset", 4 * MIB + 1], "outside the payload"),
        (["read", image, "--passphrase-file", pw, "--offset", 10, "--length", 4 * MIB], "outside the payload"),
        (["read", image, "--passphrase-file", pw, "--length", -5], "negative"),
        (["read", image, "--passphrase-file", pw, "--offset", 2**70], "outside the payload"),
        (["read", image, "--passphrase-file", pw, "--offset", "ten"], "valid integer"),
        (["read", image, "--passphrase-file", pw, "--output", image], "volume itself"),
        (["write", image, "--passphrase-file", pw, "--offset", -3, "--input", small], "negative"),
        (["write", image, "--passphrase-file", pw, "--offset", 4 * MIB - 2, "--input", small], "outside the payload"),
        (["write", image, "--passphrase-file", pw, "--input", big], "outside the payload"),
        (["write", image, "--passphrase-file", pw, "--input", image], "volume itself"),
        (["write", image, "--passphrase-file", pw, "--input", tmp_path / "missing"], "No such file"),
        (["write", image, "--passphrase-file", "-"], "standard input"),
        (["create", image, "--size", "4M", "--passphrase-file", pw, *PBKDF2_FAST], "already holds a LUKS volume"),
        (["create", image, "--size", "4M", "--passphrase-file", pw, "--sector-size", 1000], "sector size"),
        (["dump"], "Missing argument"),
        (["frobnicate", image], "No such command"),
        (["check", image], "give --passphrase-file FILE: "),
    ]
    for args, needle in cases:
        assert_one_line_error(ks(*args, check=False), needle)  # type: ignore[arg-type]
        assert sha256(image) == before, f"{args[0]} changed the volume"
    assert_one_line_error(ks("check", image, "--passphrase-file", "-", check=False, input=b""), "empty")
    ks("check", image, "--passphrase-file", pw)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--size", "12Q"], "not a size"),
        (["--size", "0"], "positive"),
        (["--size", "1001"], "multiple of the sector size"),
        (["--size", "4M", "--key-size", "384"], "key size"),
        (["--size", "4M", "--kdf", "scrypt"], "scrypt"),
        (["--size", "4M", "--label", "x" * 60], "label"),
        (["--size", "4M", "--luks1"], "512-byte sectors"),
        (["--size", "4M", "--luks1", "--sector-size", "512", "--label", "l"], "no label"),
        (["--size", "4M", "--luks1", "--sector-size", "512", "--kdf", "argon2id"], "pbkdf2"),
        (["--size", "4M", "--kdf", "pbkdf2", "--pbkdf-memory", "1000"], "argon2id only"),
        (["--size", "4M", "--pbkdf-iterations", "0"], "at least 1"),
    ],
)
def test_create_refuses_bad_options_and_leaves_no_file(tmp_path: Path, args: list[str], needle: str) -> None:
    pw = keyfile(tmp_path / "pw", b"pw")
    image = tmp_path / "new.img"
    assert_one_line_error(ks("create", image, "--passphrase-file", pw, *args, check=False), needle)
    assert not image.exists()


def test_create_over_existing_files(tmp_path: Path, volume: tuple[Path, Path]) -> None:
    image, pw = volume
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\xee" * (30 * MIB))
    ks("create", plain, "--size", "2M", "--passphrase-file", pw, *PBKDF2_FAST, "--sector-size", "512")
    assert plain.stat().st_size == 18 * MIB, "an existing file is set to header + payload"
    ks("check", plain, "--passphrase-file", pw)
    new_pw = keyfile(tmp_path / "new", b"new")
    made = json.loads(ks("create", image, "--size", "1M", "--passphrase-file", new_pw, *PBKDF2_FAST, "--force",
                         "--json").stdout)  # fmt: skip
    assert made["new_file"] is False
    ks("check", image, "--passphrase-file", new_pw)
    assert_one_line_error(ks("check", image, "--passphrase-file", pw, check=False), "wrong_passphrase")


def test_dump_never_shows_key_material(volume: tuple[Path, Path]) -> None:
    image, pw = volume
    with LuksVolume.open(str(image), pw.read_bytes()) as opened:
        key = opened.export_volume_key()
    header = image.read_bytes()[: 2 * 16384]
    texts = [ks("dump", image, "--json").stdout, ks("dump", image).stdout]
    for value in (key, key[:16], key[16:32]):
        for text in texts:
            assert value.hex().encode() not in text and base64.b64encode(value) not in text
    for text in texts:  # salts and digests are not shown either
        assert b'"salt"' not in text and b'"digest":' not in text.replace(b'"digest": 0', b"")
        assert b"correct horse" not in text
    assert b"e2e" in header  # (the label is in the header, and in the dump)


def test_argon2_memory_above_the_limit_is_reported(tmp_path: Path) -> None:
    cryptsetup = tool("cryptsetup", "cryptsetup-bin")
    pw = keyfile(tmp_path / "pw", b"argon")
    limited = {**os.environ, "KEYSTEWARD_ARGON2_MEMORY_LIMIT": "16M"}
    image = tmp_path / "new.img"
    done = subprocess.run([KEYSTEWARD, "volume", "create", str(image), "--size", "1M", "--passphrase-file", str(pw),
                           "--kdf", "argon2id", "--pbkdf-memory", "32768"], env=limited, capture_output=True,
                          check=False)  # fmt: skip
    assert_one_line_error(done, "luks_argon2_memory", "32768 KiB")
    assert not image.exists()
    made = tmp_path / "cs.img"
    with made.open("wb") as fh:
        fh.truncate(20 * MIB)
    run([cryptsetup, "luksFormat", "--batch-mode", "--type", "luks2", *CS_ARGON2_SMALL, "--key-file", str(pw),
         str(made)])  # fmt: skip
    before = sha256(made)
    done = subprocess.run([KEYSTEWARD, "volume", "check", str(made), "--passphrase-file", str(pw)], env=limited,
                          capture_output=True, check=False)  # fmt: skip
    line = assert_one_line_error(done, "luks_argon2_memory", "32768 KiB", "16384 KiB")
    assert "more than" in line
    assert_one_line_error(ks("--argon2-memory-limit", "8M", "read", made, "--passphrase-file", pw, check=False),
                          "luks_argon2_memory")  # fmt: skip
    assert sha256(made) == before
    ks("check", made, "--passphrase-file", pw)  # the machine's own limit is far above 32 MiB


def test_help_lists_every_group_and_volume_loads_nothing_heavy(volume: tuple[Path, Path]) -> None:
    text = run([KEYSTEWARD, "--help"]).stdout.decode()
    for group in ("server", "tenant", "key", "crypto", "audit", "volume"):
        assert f" {group} " in text
    verbs = run([KEYSTEWARD, "volume", "--help"]).stdout.decode()
    for verb in ("create", "dump", "check", "read", "write", "add-key", "remove-key"):
        assert verb in verbs
    probe = (  # volume verbs leave by os._exit (no interpreter teardown): report the modules just before
        "import os, sys\n"
        "heavy = ('httpx', 'sqlalchemy', 'fastapi', 'uvicorn', 'rich')\n"
        "leave = os._exit\n"
        "def report(status):\n"
        "    print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)), flush=True)\n"
        "    leave(status)\n"
        "os._exit = report\n"
        f"sys.argv = ['keysteward', 'volume', 'check', {str(volume[0])!r}, '--passphrase-file', {str(volume[1])!r}]\n"
        "from keysteward.cli.main import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_write_with_fsync_and_help_of_every_verb(tmp_path: Path, volume: tuple[Path, Path]) -> None:
    image, pw = volume
    data = pattern(MIB + 3, 7)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    ks("write", image, "--passphrase-file", pw, "--input", source, "--offset", 5, "--fsync")
    assert ks("read", image, "--passphrase-file", pw, "--offset", 5, "--length", len(data)).stdout == data
    for verb in ("create", "dump", "check", "read", "write", "add-key", "remove-key"):
        text = ks(verb, "--help").stdout.decode()
        assert text.startswith(f"Usage: keysteward volume {verb} [OPTIONS] PATH") and "--help" in text
    assert "--fsync" in ks("write", "--help").stdout.decode()
    # global options before the group go through the full app, which hands over to the same parser
    done = run([KEYSTEWARD, "--url", "https://127.0.0.1:1", "volume", "check", str(image), "--passphrase-file",
                str(pw), "--json"])  # fmt: skip
    assert json.loads(done.stdout)["ok"] is True
    assert_one_line_error(run([KEYSTEWARD, "--url", "https://127.0.0.1:1", "volume", "check", str(image)],
                              check=False), "give --passphrase-file FILE: ")  # fmt: skip
    bare = run([KEYSTEWARD, "volume"], check=False)
    assert bare.returncode == 2 and b"Commands:" in bare.stdout
