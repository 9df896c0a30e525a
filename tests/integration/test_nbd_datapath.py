"""The proxy's data path under load: replies gathered into one write, buffers reused between requests,
reads served on the event loop from the page cache or by a worker thread from the disk.

Each test pipelines many requests on a real socket to a real :class:`NbdServer` and checks every reply's
bytes against what was written, so a buffer reused before the transport sent it, a write payload
encrypted twice or a reply paired with the wrong handle shows up as wrong bytes."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from keysteward.formats import nbd
from keysteward.proxy.export import LuksExport
from keysteward.volume import LuksVolume
from tests.support.nbd import MIB, PASSPHRASE, RawClient, ServerThread, make_volume

pytestmark = pytest.mark.integration

SIZE = 16 * MIB
KIB = 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerThread, Path]]:
    image = make_volume(tmp_path / "vol.img", SIZE)
    with ServerThread({"vol": LuksExport.open("vol", str(image), PASSPHRASE)}) as server:
        yield server, image


def _pattern(offset: int, length: int) -> bytes:
    """Bytes that differ at every 8-byte position of the volume: a misplaced or stale buffer cannot match."""
    first = offset // 8
    words = b"".join((first + i).to_bytes(8, "little") for i in range(-(-(length + offset % 8) // 8)))
    return words[offset % 8 : offset % 8 + length]


def _fill(client: RawClient, chunk: int = MIB) -> None:
    """Write the pattern over the whole volume, pipelined (every write's payload goes through the reused,
    encrypted-in-place buffers)."""
    handles = {client.request(nbd.CMD_WRITE, pos, chunk, payload=_pattern(pos, chunk)) for pos in range(0, SIZE, chunk)}
    for _ in range(len(handles)):
        handle, error, _data = client.reply()
        assert error == 0
        handles.remove(handle)
    client.flush()


def test_pipelined_reads_to_a_slow_reader_each_get_their_own_bytes(served: tuple[ServerThread, Path]) -> None:
    """A client sends 300 reads of every size (4 KiB to 1 MiB, some not sector-aligned) without reading
    a reply, with a small receive buffer, then reads the replies slowly: the server's transport fills and
    pushes back while reply buffers wait to be sent. Every reply carries exactly its range's bytes."""
    server, _image = served
    writer = RawClient.connect(server.port)
    writer.open("vol")
    _fill(writer)
    writer.disconnect()

    client = RawClient.connect(server.port)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
    client.open("vol")
    rng = random.Random(15)
    expected: dict[int, tuple[int, int]] = {}
    for _ in range(300):
        length = rng.choice([4 * KIB, 64 * KIB, 256 * KIB, MIB, 3 * 512, 100])
        offset = rng.randrange(0, SIZE - length)
        if rng.random() < 0.7:
            offset -= offset % 4096
        expected[client.request(nbd.CMD_READ, offset, length)] = (offset, length)
    for i in range(len(expected)):
        if i % 50 == 0:
            os.sched_yield()
        handle, error, data = client.reply()
        assert error == 0
        offset, length = expected.pop(handle)
        assert data == _pattern(offset, length), (offset, length)
    client.disconnect()


def test_pipelined_writes_land_whole_and_read_back(served: tuple[ServerThread, Path]) -> None:
    """Pipelined writes of several sizes, aligned and not (a partial sector is patched), each with its own
    pattern: read back through NBD and straight from the volume file, every byte is the last write's."""
    server, image = served
    client = RawClient.connect(server.port)
    client.open("vol")
    _fill(client)
    rng = random.Random(16)
    model = bytearray(_pattern(0, SIZE))
    pending: set[int] = set()
    busy: list[tuple[int, int]] = []
    """Ranges of the writes in flight: writes in flight together never share a byte (NBD leaves the order
    of overlapping writes in flight open; disjoint ones sharing a sector are the server's to get right)."""
    for _ in range(120):
        length = rng.choice([4 * KIB, 256 * KIB, MIB, 512, 7000])
        offset = rng.randrange(0, SIZE - length)
        if rng.random() < 0.6:
            offset -= offset % 4096
        if any(offset < end and start < offset + length for start, end in busy):
            continue
        busy.append((offset, offset + length))
        data = rng.randbytes(length)
        model[offset : offset + length] = data
        pending.add(client.request(nbd.CMD_WRITE, offset, length, payload=data))
        if len(pending) >= 24:
            busy.clear()
            for _ in range(len(pending)):
                handle, error, _data = client.reply()
                assert error == 0
                pending.remove(handle)
    for _ in range(len(pending)):
        handle, error, _data = client.reply()
        assert error == 0
        pending.remove(handle)
    client.flush()
    for pos in range(0, SIZE, 4 * MIB):
        assert client.read(pos, 4 * MIB) == model[pos : pos + 4 * MIB]
    client.disconnect()
    server.set_exports({})  # closes the export: the file is ours to open
    with LuksVolume.open(str(image), PASSPHRASE) as volume:
        assert volume.read(0, SIZE) == model


def test_reads_from_the_disk_are_served_by_workers(served: tuple[ServerThread, Path]) -> None:
    """With the volume's pages dropped from the page cache, reads cannot run on the event loop
    (``RWF_NOWAIT`` says they would wait): they are served by worker threads, with the right bytes."""
    server, image = served
    client = RawClient.connect(server.port)
    client.open("vol")
    _fill(client)
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    handles = {client.request(nbd.CMD_READ, pos, 256 * KIB): pos for pos in range(0, SIZE, 256 * KIB)}
    for _ in range(len(handles)):
        handle, error, data = client.reply()
        assert error == 0
        pos = handles.pop(handle)
        assert data == _pattern(pos, 256 * KIB)
    client.disconnect()
