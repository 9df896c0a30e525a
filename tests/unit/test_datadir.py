"""Data directory modes (keysteward.server.datadir): links are not followed, odd database URLs are harmless."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from keysteward.server import datadir

pytestmark = pytest.mark.unit


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_lock_down_restricts_files_and_dirs_but_not_what_links_point_to(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o644)
    data = tmp_path / "data"
    datadir.prepare(data)
    (data / "sub").mkdir(mode=0o755)
    (data / "sub" / "f").write_text("x")
    (data / "sub" / "f").chmod(0o664)
    (data / "link").symlink_to(outside)
    (data / "dirlink").symlink_to(tmp_path)
    data.chmod(0o755)
    parent_mode = mode(tmp_path)
    changed = datadir.lock_down(data)
    assert mode(data) == 0o700 and mode(data / "sub") == 0o700 and mode(data / "sub" / "f") == 0o600
    assert mode(outside) == 0o644 and mode(tmp_path) == parent_mode  # what the links point to is untouched
    assert outside not in changed and set(changed) == {data, data / "sub", data / "sub" / "f"}
    assert datadir.lock_down(data) == []  # nothing left to change


@pytest.mark.parametrize(
    ("url", "first"),
    [
        ("sqlite:////var/lib/ks/keysteward.db", "/var/lib/ks/keysteward.db"),
        ("sqlite:////var/lib/ks/keysteward.db?timeout=5", "/var/lib/ks/keysteward.db"),
        ("sqlite:///", None),
        ("sqlite:///:memory:", None),
        ("postgresql+psycopg://u:p@h/db", None),
        ("", None),
        ("garbage", None),
    ],
)
def test_sqlite_files(url: str, first: str | None) -> None:
    files = datadir.sqlite_files(url)
    if first is None:
        assert files == ()
    else:
        assert str(files[0]) == first and {str(f)[len(first) :] for f in files} >= {"-wal", "-shm"}


def test_prepare_refuses_a_path_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(datadir.BadRequest) as err:
        datadir.prepare(blocker / "data")
    assert err.value.code == "data_dir_mode"
