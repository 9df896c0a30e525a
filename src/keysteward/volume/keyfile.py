"""Passphrases from key files, read like cryptsetup's ``--key-file``: raw bytes, no newline stripping."""

from __future__ import annotations

import os
import stat

from keysteward.volume.errors import io_error, option_error

MAX_KEY_FILE = 8 * 1024 * 1024
"""cryptsetup's default ``--keyfile-size`` limit (8 MiB)."""


def read_key_file(path: str, *, stdin_fd: int = 0) -> bytearray:
    """The whole file (``-``: standard input) as a bytearray the caller wipes when done."""
    try:
        fd = stdin_fd if path == "-" else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise io_error(exc, "read the key file", path) from exc
    data = bytearray()
    try:
        if path != "-" and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise option_error(f"key file {path} is a directory")
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_KEY_FILE:
                raise option_error(f"key file {path} is larger than {MAX_KEY_FILE} bytes")
    except BaseException as exc:
        data[:] = bytes(len(data))
        if isinstance(exc, OSError):
            raise io_error(exc, "read the key file", path) from exc
        raise
    finally:
        if path != "-":
            os.close(fd)
    if not data:
        raise option_error(f"key file {path} is empty")
    return data
