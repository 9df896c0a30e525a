"""The data directory's permissions: 0700 for it and its directories, 0600 for every file in it.

It holds the database (wrapped keys, token hashes, the audit log), the TLS private key and the
configuration (which may name a database password). ``server init`` creates it, or takes over an
existing directory, and forces these modes whatever the umask or the directory's old mode was: the
directory first, so nothing written afterwards is ever reachable by another user; ``server start``
checks again and repairs what changed. SQLite creates its -wal and -shm files with the database
file's mode, so they follow. Symbolic links are neither followed nor changed.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from keysteward.errors import BadRequest

log = logging.getLogger("keysteward.server")
DIR_MODE = 0o700
FILE_MODE = 0o600


def _restrict(path: Path, directory: bool) -> bool:
    """Set one entry's mode without following a link; True when it changed."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not path.is_symlink() and path.exists():
            raise BadRequest(f"cannot open {path} to restrict its mode: {exc.strerror}", code="data_dir_mode") from exc
        return False  # a link, or gone since it was listed
    try:
        st = os.fstat(fd)
        kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
        mode = DIR_MODE if directory else FILE_MODE
        if not kind_ok or stat.S_IMODE(st.st_mode) == mode:
            return False
        os.fchmod(fd, mode)
        return True
    except OSError as exc:
        raise BadRequest(f"cannot restrict the mode of {path}: {exc.strerror}", code="data_dir_mode") from exc
    finally:
        os.close(fd)


def prepare(data_dir: Path) -> None:
    """Create the data directory (or take over an existing one) as 0700, before anything is written into it."""
    try:
        data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise BadRequest(f"cannot create {data_dir}: {exc.strerror}", code="data_dir_mode") from exc
    _restrict(data_dir, directory=True)


def lock_down(data_dir: Path, extra_files: tuple[Path, ...] = ()) -> list[Path]:
    """Force 0700 on the data directory and the directories in it, 0600 on its files; returns what changed."""
    changed: list[Path] = []
    if _restrict(data_dir, directory=True):
        changed.append(data_dir)
    for top, dirs, files in os.walk(data_dir):  # does not descend into linked directories
        for name in dirs:
            if _restrict(Path(top) / name, directory=True):
                changed.append(Path(top) / name)
        for name in files:
            if _restrict(Path(top) / name, directory=False):
                changed.append(Path(top) / name)
    for path in extra_files:
        if path.exists() and _restrict(path, directory=False):
            changed.append(path)
    return changed


def sqlite_files(database_url: str) -> tuple[Path, ...]:
    """The files of a SQLite database named by ``database_url`` (none for other engines or memory)."""
    prefix = "sqlite:///"
    if not database_url.startswith(prefix) or database_url in (prefix, prefix + ":memory:"):
        return ()
    path = Path(database_url[len(prefix) :].split("?", 1)[0])
    return tuple(Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm", "-journal", ".writelock"))


def secure(data_dir: Path, database_url: str) -> None:
    """``lock_down`` with the SQLite files wherever they are; logs each mode it had to change."""
    for path in lock_down(data_dir, sqlite_files(database_url)):
        log.warning("restricted the mode of %s (the data directory is for the server's user only)", path)
