"""The shared store of KMIP's TLS sessions (keysteward/server/tls_sessions.py): sealed records in shared memory.

What a worker writes another must read back for that session id only; everything else (another id in the same
slot, another listener's or another start's key, a torn, flipped or forged record, garbage lengths) is a miss,
never an exception and never someone else's session.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from keysteward.server import tls_sessions as ts


def _store(fd: int, listener: str = "kmip", secret: bytes = b"s" * 32) -> ts.SessionStore:
    return ts.SessionStore(fd, ts.store_key(secret, listener), listener)


@pytest.fixture
def fd() -> Iterator[int]:
    fd = ts.new_store(8)
    yield fd
    os.close(fd)


def test_a_session_one_worker_wrote_opens_at_another_for_its_id_only(fd: int) -> None:
    one, other = _store(fd), _store(fd)  # two mappings of one memfd, as two workers have
    session_id, session = os.urandom(32), os.urandom(900)
    assert one.put(session_id, session)
    assert other.get(session_id) == session
    same_slot = session_id[:8] + os.urandom(24)  # lands in the same slot, is another session
    assert other.get(same_slot) is None
    assert other.get(b"") is None


def test_a_record_opens_only_under_its_listener_and_its_start(fd: int) -> None:
    session_id = os.urandom(32)
    _store(fd, "rest").put(session_id, b"session of the REST port")
    assert _store(fd, "kmip").get(session_id) is None  # a REST session resumes nothing at KMIP
    assert _store(fd, "rest", secret=b"t" * 32).get(session_id) is None  # nor after a restart (new secret)
    assert _store(fd, "rest").get(session_id) == b"session of the REST port"


def test_the_store_holds_no_session_in_clear(fd: int) -> None:
    session = b"master-secret-" + os.urandom(48)
    _store(fd).put(os.urandom(32), session)
    with open(f"/proc/self/fd/{fd}", "rb") as raw:
        assert session[:14] not in raw.read()


def test_the_last_session_written_to_a_slot_wins(fd: int) -> None:
    store = _store(fd)
    first, second = os.urandom(32), os.urandom(32)
    second = first[:8] + second[8:]
    store.put(first, b"one")
    store.put(second, b"two")
    assert store.get(first) is None and store.get(second) == b"two"


def test_an_oversized_session_is_not_written(fd: int) -> None:
    store = _store(fd)
    session_id = os.urandom(32)
    store.put(session_id, b"kept")
    assert not store.put(session_id, bytes(ts.SLOT_BYTES))
    assert store.get(session_id) == b"kept"
    assert not store.put(b"", b"no id")


@pytest.mark.parametrize("damage", ["flip", "truncate", "length_max", "length_zero", "length_short", "zero"])
def test_a_damaged_record_is_a_miss(fd: int, damage: str) -> None:
    store = _store(fd)
    session_id = os.urandom(32)
    store.put(session_id, os.urandom(500))
    raw = memoryview(store._map)
    at = int.from_bytes(session_id[:8], "little") % 8 * ts.SLOT_BYTES
    length = int.from_bytes(raw[at : at + 2], "little")
    if damage == "flip":
        raw[at + 2 + length // 2] ^= 1
    elif damage == "truncate":
        raw[at : at + 2] = (length - 1).to_bytes(2, "little")
    elif damage == "length_max":
        raw[at : at + 2] = b"\xff\xff"
    elif damage == "length_zero":
        raw[at : at + 2] = b"\0\0"
    elif damage == "length_short":
        raw[at : at + 2] = (5).to_bytes(2, "little")
    else:
        raw[at : at + ts.SLOT_BYTES] = bytes(ts.SLOT_BYTES)
    raw.release()
    assert store.get(session_id) is None


def test_random_memory_is_never_a_session(fd: int) -> None:
    store = _store(fd)
    rng = random.Random(7)
    for _ in range(200):
        store._map[:] = rng.randbytes(len(store._map))
        assert store.get(rng.randbytes(32)) is None


@pytest.mark.parametrize("size", [0, 100, ts.SLOT_BYTES + 1])
def test_a_store_of_no_whole_slots_is_refused(size: int) -> None:
    fd = os.memfd_create("bad-store")
    try:
        os.ftruncate(fd, size)
        with pytest.raises(ValueError, match="whole slots"):
            _store(fd)
    finally:
        os.close(fd)


def test_a_worker_maps_the_store_once_and_closes_the_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    fd = ts.new_store(4)
    monkeypatch.setenv(ts.STORE_FD, str(fd))
    store = ts.store_from_supervisor(b"s" * 32, "kmip")
    assert store is not None
    assert ts.STORE_FD not in os.environ  # nothing left for a child process to inherit
    with pytest.raises(OSError):
        os.fstat(fd)
    session_id = os.urandom(32)
    assert store.put(session_id, b"x") and store.get(session_id) == b"x"  # the mapping outlives the descriptor
    assert ts.store_from_supervisor(b"s" * 32, "kmip") is None  # started alone


def test_no_secret_no_store_and_the_descriptor_still_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    fd = ts.new_store(4)
    monkeypatch.setenv(ts.STORE_FD, str(fd))
    assert ts.store_from_supervisor(None, "kmip") is None
    with pytest.raises(OSError):
        os.fstat(fd)
    monkeypatch.setenv(ts.STORE_FD, "not-a-number")
    assert ts.store_from_supervisor(b"s" * 32, "kmip") is None
