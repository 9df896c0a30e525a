"""The files and pipes VM state streams through (keysteward.host.state_file): real files and pipes."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from keysteward.host import state_file
from keysteward.host.state_file import ThreadedSink, WriteBehindFile, sync_directory, widen_pipe

pytestmark = pytest.mark.unit


def test_write_behind_file_holds_every_byte_in_order_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state.part"
    chunks = [os.urandom(n) for n in (1, 4096, 3 << 20, 5, 1 << 20)]
    with WriteBehindFile(str(path), every=1 << 20) as out:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[out.write(view) :]
        out.sync()
        assert out.size == sum(map(len, chunks))
    assert path.read_bytes() == b"".join(chunks)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state_file._sync_file_range is not None, "Linux has sync_file_range: the writeback starts as it goes"


def test_write_behind_file_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "state.part"
    path.write_bytes(b"an earlier snapshot")
    with pytest.raises(FileExistsError):
        WriteBehindFile(str(path))
    assert path.read_bytes() == b"an earlier snapshot"


def test_a_closed_write_behind_file_refuses_writes(tmp_path: Path) -> None:
    out = WriteBehindFile(str(tmp_path / "s"))
    out.close()
    out.close()  # twice is harmless
    with pytest.raises(OSError):
        out.write(b"x")


def test_widen_pipe_holds_a_megabyte_and_passes_bytes_unchanged() -> None:
    read_fd, write_fd = os.pipe()
    try:
        assert widen_pipe(write_fd) == state_file.PIPE_BYTES  # root here; over the limit it keeps 64 KiB
        for absurd in (0, 1 << 40):
            with pytest.raises(ValueError, match="4 KiB to 64 MiB"):
                widen_pipe(write_fd, absurd)
        data = os.urandom(3 << 20)
        got = bytearray()

        def drain() -> None:
            while chunk := os.read(read_fd, 1 << 20):
                got.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view) :]
        os.close(write_fd)
        write_fd = -1
        reader.join(10)
        assert bytes(got) == data
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_sync_directory_refuses_a_file(tmp_path: Path) -> None:
    sync_directory(str(tmp_path))
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        sync_directory(str(tmp_path / "f"))


def test_threaded_sink_writes_every_byte_in_order_through_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: [got.extend(c) for c in iter(lambda: os.read(read_fd, 65536), b"")])
    reader.start()
    chunks = [os.urandom(n) for n in (1, (1 << 20) - 7, 3 << 20, 0, 12345)]
    with os.fdopen(write_fd, "wb", buffering=0) as pipe:
        sink = ThreadedSink(pipe, depth=2)
        for chunk in chunks:
            assert sink.write(memoryview(chunk)) == len(chunk)
        sink.close()
        pool = list(sink._pool)
    reader.join(10)
    os.close(read_fd)
    assert bytes(got) == b"".join(chunks)
    assert all(not any(buf) for buf in pool), "the pool held plaintext state: wiped at close"


def test_threaded_sink_raises_the_writers_error_in_the_callers_thread() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # QEMU went away
    with os.fdopen(write_fd, "wb", buffering=0) as pipe:
        sink = ThreadedSink(pipe, size=4096, depth=2)
        with pytest.raises(BrokenPipeError):
            for _ in range(100):
                sink.write(b"x" * 4096)
                time.sleep(0.001)
            sink.close()
        with pytest.raises(BrokenPipeError):
            sink.close()
