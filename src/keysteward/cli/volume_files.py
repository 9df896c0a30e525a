"""The files around a volume verb: where ``volume read`` writes and ``volume write`` reads (a path or the
standard streams), never the volume itself (refused as ``--output``/``--input``, by device and inode)."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable

from keysteward.volume.errors import io_error, option_error


def same_file(fd: int, device_fd: int) -> bool:
    mine, theirs = os.fstat(fd), os.fstat(device_fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino) or (
        stat.S_ISBLK(mine.st_mode) and mine.st_rdev == theirs.st_rdev
    )


def open_output(output: str | None, device_fd: int) -> int:
    if output is None:
        fd = sys.stdout.fileno()
    else:
        try:
            info, volume = os.stat(output), os.fstat(device_fd)
            if (info.st_dev, info.st_ino) == (volume.st_dev, volume.st_ino):
                raise option_error("--output is the volume itself")
        except FileNotFoundError:
            pass
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error(exc, "open", output) from exc
    if same_file(fd, device_fd):
        raise option_error("the output is the volume itself")
    return fd


def fd_sink(fd: int, name: str) -> Callable[[memoryview], None]:
    def sink(view: memoryview) -> None:
        while view.nbytes:
            try:
                n = os.write(fd, view)
            except OSError as exc:
                raise io_error(exc, "write", name) from exc
            view = view[n:]

    return sink


def open_input(input_file: str | None, volume_path: str) -> tuple[int, int | None]:
    """The input's descriptor and, when it is a regular file, how many bytes are left in it."""
    if input_file is None:
        fd = sys.stdin.fileno()
    else:
        try:
            fd = os.open(input_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise io_error(exc, "open", input_file) from exc
    try:
        info = os.fstat(fd)
        try:
            volume = os.stat(volume_path)
        except OSError as exc:
            raise io_error(exc, "open", volume_path) from exc
        if (info.st_dev, info.st_ino) == (volume.st_dev, volume.st_ino):
            raise option_error("the input is the volume itself")
        if stat.S_ISDIR(info.st_mode):
            raise option_error(f"{input_file} is a directory")
        known = info.st_size - os.lseek(fd, 0, os.SEEK_CUR) if stat.S_ISREG(info.st_mode) else None
    except BaseException:
        if input_file is not None:
            os.close(fd)
        raise
    return fd, known
