"""Bad backups and busy targets are refused by ``keysteward backup restore`` before anything is written.

Each case takes a good backup of a real key manager and damages it as a bad disk, a cut-off copy or a
meddler would: cut mid-line, cut at a line end (no trailer), one hex digit changed, the magic changed, a
future format or schema revision, an older schema revision, and forgeries whose digest was recomputed (a
row that fits no table, a value of the wrong type, a binary value that is not base64, a table left out,
an unknown table). Every one must fail with ``bad_backup`` and leave no data directory behind; ``backup
verify`` refuses the same files. A data directory that holds a database, a directory that holds other
files, and an existing output file are refused and left as they were.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.keysteward import KEYSTEWARD, SecretRegistry, init_manager

pytestmark = pytest.mark.e2e


def _ks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KEYSTEWARD, *args], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin"})


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, secret_registry: SecretRegistry) -> tuple[Path, bytes]:
    data_dir = tmp_path_factory.mktemp("bk") / "ks"
    init_manager(data_dir, secret_registry, seal="shamir", threshold=2, shares=3)
    out = data_dir.parent / "good.backup"
    made = _ks("backup", "create", "--data-dir", str(data_dir), "--output", str(out), "--json")
    assert made.returncode == 0, made.stderr
    secret_registry.place(out)
    return data_dir, out.read_bytes()


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def _redigest(lines: list[bytes]) -> bytes:
    """A forger's file: the body changed and the trailer's SHA-256 recomputed to match."""
    body = b"".join(lines[:-1])
    trailer = json.loads(lines[-1])
    trailer["sha256"] = hashlib.sha256(body).hexdigest()
    return body + json.dumps(trailer).encode() + b"\n"


def _header(data: bytes, **changes: object) -> bytes:
    lines = _lines(data)
    header = json.loads(lines[0])
    header.update(changes)
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + b"".join(lines[1:])


def _flip_hex(data: bytes) -> bytes:
    """One hex digit of the first audit head's hash changed (the JSON stays valid)."""
    lines = _lines(data)
    line = lines[2]
    i = line.rindex(b'"') - 1
    lines[2] = line[:i] + (b"0" if line[i : i + 1] != b"0" else b"1") + line[i + 1 :]
    return b"".join(lines)


def _row_change(data: bytes, change: Callable[[list[object]], list[object]]) -> bytes:
    lines = _lines(data)
    lines[2] = json.dumps(change(json.loads(lines[2]))).encode() + b"\n"
    return _redigest(lines)


def _cluster_binary(data: bytes) -> bytes:
    lines = _lines(data)
    for i, line in enumerate(lines):
        if line.startswith(b'{"table":"cluster"'):
            columns = json.loads(line)["columns"]
            row = json.loads(lines[i + 1])
            row[columns.index("sealed_root")] = "not base64!"
            lines[i + 1] = json.dumps(row).encode() + b"\n"
            return _redigest(lines)
    raise AssertionError("no cluster table in the backup")


CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda d: b"", "damaged header"),
    "cut mid-line": (lambda d: d[: len(d) // 2], "a line without its end"),
    "cut at a line end": (lambda d: b"".join(_lines(d)[:-1]), "no trailer"),
    "one hex digit changed": (_flip_hex, "SHA-256 does not match"),
    "wrong magic": (lambda d: d.replace(b"keysteward-backup", b"keysteward-backuq", 1), "wrong magic"),
    "future format": (lambda d: _header(d, format=2), "newer than this keysteward reads"),
    "future schema": (lambda d: _header(d, schema_revision="9999"), "unknown to this keysteward"),
    "older schema": (lambda d: _header(d, schema_revision="0001"), "with the keysteward version that made it"),
    "forged: a row with a column too many": (lambda d: _row_change(d, lambda r: [*r, 1]), "fits no table"),
    "forged: a row with a wrong type": (lambda d: _row_change(d, lambda r: [r[0], "3", r[2]]), "bad value"),
    "forged: binary that is not base64": (_cluster_binary, "bad value in cluster.sealed_root"),
    "forged: a table left out": (
        lambda d: _redigest([line for line in _lines(d) if not line.startswith(b'{"table":"revoked_instances"')]),
        "tables are missing",
    ),
    "forged: an unknown table": (
        lambda d: _redigest([*_lines(d)[:1], b'{"table":"evil","columns":["id"]}\n', *_lines(d)[1:]]),
        "unknown or repeated table",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_backup_is_refused_before_anything_is_written(
    case: str, good: tuple[Path, bytes], tmp_path: Path
) -> None:
    damage, why = CASES[case]
    bad = tmp_path / "bad.backup"
    bad.write_bytes(damage(good[1]))
    target = tmp_path / "restored"
    r = _ks("backup", "restore", str(bad), "--data-dir", str(target))
    assert r.returncode == 1, r.stdout
    assert "(bad_backup)" in r.stderr and why in r.stderr and "nothing was restored" in r.stderr, r.stderr
    assert not target.exists()
    checked = _ks("backup", "verify", str(bad))
    assert checked.returncode == 1 and why in checked.stderr


def test_the_good_backup_passes_the_same_checks(good: tuple[Path, bytes], tmp_path: Path) -> None:
    """The refusals above are for the damage, not for any file: the undamaged copy verifies and restores."""
    copy = tmp_path / "copy.backup"
    copy.write_bytes(good[1])
    assert json.loads(_ks("backup", "verify", str(copy), "--json").stdout)["engine"] == "sqlite"
    r = _ks("backup", "restore", str(copy), "--data-dir", str(tmp_path / "restored"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "restored" / "keysteward.toml").exists()


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_target_that_holds_a_database_is_refused_and_left_as_it_was(good: tuple[Path, bytes], tmp_path: Path) -> None:
    data_dir, data = good
    backup = tmp_path / "good.backup"
    backup.write_bytes(data)
    before = _digests(data_dir)
    r = _ks("backup", "restore", str(backup), "--data-dir", str(data_dir))
    assert r.returncode == 1 and "(restore_target_not_empty)" in r.stderr, r.stderr
    assert _digests(data_dir) == before


def test_a_directory_with_other_files_is_refused_and_left_as_it_was(good: tuple[Path, bytes], tmp_path: Path) -> None:
    backup = tmp_path / "good.backup"
    backup.write_bytes(good[1])
    target = tmp_path / "somewhere"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    r = _ks("backup", "restore", str(backup), "--data-dir", str(target))
    assert r.returncode == 1 and "(restore_target_not_empty)" in r.stderr, r.stderr
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"


def test_create_never_overwrites_a_file(good: tuple[Path, bytes], tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.write_text("keep me")
    r = _ks("backup", "create", "--data-dir", str(good[0]), "--output", str(existing))
    assert r.returncode == 1 and existing.read_text() == "keep me"
