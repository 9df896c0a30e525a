"""The volume data path (keysteward.volume.datapath) against a plaintext model and the reference XTS.

Every test checks twice: what keysteward reads back equals a plain ``bytearray`` model of the payload,
and the ciphertext on disk decrypts, with the reference implementation (one pyca ``Cipher`` per
sector, ``decrypt_sectors_reference``), to that same model. That pins the sector numbering (512-byte
IV units for every sector size, plus ``iv_tweak``) to something independent of the native path.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keysteward.crypto.xts_reference import decrypt_sectors_reference
from keysteward.formats import luks
from keysteward.volume import LuksVolume, VolumeRequestError, datapath
from keysteward.volume.device import Device

pytestmark = pytest.mark.unit

KIB = 1024
PASSPHRASE = b"datapath"
DATA_OFFSET = 512 * KIB


def _make(path: Path, *, sector: int, payload: int, iv_tweak: int = 0, key_size: int = 64) -> bytes:
    """A LUKS2 file made with the codec (small data offset), optionally with an ``iv_tweak``; returns the key."""
    rng = random.Random(sector + iv_tweak).randbytes
    key = rng(key_size)
    data_offset = DATA_OFFSET
    size = data_offset + payload
    made = luks.format_luks2(
        key, PASSPHRASE, device_size=size, data_offset=data_offset, sector_size=sector,
        kdf_params=luks.new_pbkdf2(iterations=1000, rng=rng), rng=rng,
    )  # fmt: skip
    writes = list(made.writes)
    if iv_tweak:
        meta = made.header.metadata
        segment = replace(meta.segments[0], iv_tweak=iv_tweak)
        meta = luks.validate_metadata(replace(meta, segments=MappingProxyType({0: segment})), device_size=size)
        writes = [writes[0], *luks.serialize_luks2(replace(made.header, seqid=0), meta)]
    image = bytearray(size)
    for write in writes:
        image[write.offset : write.end] = write.data
    image[data_offset:] = rng(payload)  # some "old" ciphertext
    path.write_bytes(image)
    return key


def _reference_plain(path: Path, key: bytes, sector: int, iv_tweak: int) -> bytes:
    raw = path.read_bytes()[DATA_OFFSET:]
    return decrypt_sectors_reference(key, sector, raw, 0, iv_tweak)


CASES = [(512, 0), (4096, 0), (4096, 12345), (512, 2**40 + 3)]


@pytest.mark.parametrize(("sector", "iv_tweak"), CASES)
def test_reads_and_writes_match_the_model_and_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sector: int, iv_tweak: int
) -> None:
    monkeypatch.setattr(datapath, "CHUNK", 16 * KIB)  # many chunks: the pipeline and its threads run
    image = tmp_path / "v.img"
    payload = 200 * KIB
    key = _make(image, sector=sector, payload=payload, iv_tweak=iv_tweak)
    model = bytearray(_reference_plain(image, key, sector, iv_tweak))
    rng = random.Random(sector ^ iv_tweak)
    with LuksVolume.open(str(image), PASSPHRASE, writable=True) as volume:
        assert volume.export_volume_key() == key and volume.geometry.iv_tweak == iv_tweak
        assert volume.read(0, payload) == bytes(model)
        for _ in range(40):
            offset = rng.randrange(payload)
            length = rng.choice([1, 7, sector - 1, sector, sector + 1, 3 * sector, 40 * KIB + 3, payload - offset])
            length = min(length, payload - offset)
            data = rng.randbytes(length)
            volume.write(offset, data)
            model[offset : offset + length] = data
            start = rng.randrange(payload)
            end = rng.randrange(start, payload + 1)
            assert volume.read(start, end - start) == bytes(model[start:end])
        ciphers = len(volume._sectors._ciphers)
        assert 1 <= ciphers <= datapath.MAX_WORKERS + 1, "ciphers are pooled, not made per call"
    assert _reference_plain(image, key, sector, iv_tweak) == bytes(model)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.integers(0, 64 * KIB),
    pieces=st.lists(st.integers(1, 9000), min_size=0, max_size=12),
    workers=st.sampled_from([1, 2, 3]),
)
# Found by hypothesis: windows ending mid-sector on two worker threads, input running past the payload.
# It failed on a read-modify-write of a sector whose previous window was still on its way to the disk,
# and on windows cancelled when the input ran past the end.
@example(offset=65531, pieces=[2, 40, 7308, 7424, 9000, 9000], workers=2)
@example(offset=5, pieces=[4093, 3, 4096, 2, 4200], workers=3)
def test_streamed_writes_of_any_shape(tmp_path: Path, offset: int, pieces: list[int], workers: int) -> None:
    """An input that arrives in odd pieces (like a pipe) lands exactly where it should."""
    image = tmp_path / "stream.img"
    payload = 96 * KIB
    key = _make(image, sector=4096, payload=payload)
    total = sum(pieces)
    data = random.Random(total).randbytes(total)
    model = bytearray(_reference_plain(image, key, 4096, 0))
    fits = offset + total <= payload
    stream = iter(memoryview(data)[sum(pieces[:i]) : sum(pieces[: i + 1])] for i in range(len(pieces)))
    pending: list[memoryview] = []

    def read_into(view: memoryview) -> int:
        if not pending:
            piece = next(stream, None)
            if piece is None:
                return 0
            pending.append(piece)
        piece = pending.pop()
        n = min(view.nbytes, piece.nbytes)
        view[:n] = piece[:n]
        if n < piece.nbytes:
            pending.append(piece[n:])
        return n

    original = datapath.CHUNK
    datapath.CHUNK = 8 * KIB
    try:
        with LuksVolume.open(str(image), PASSPHRASE, writable=True) as volume:
            volume._sectors._workers = workers  # the thread count is what varies here
            if fits:
                assert volume.write_from(offset, read_into) == total
                model[offset : offset + total] = data
            else:
                with pytest.raises(VolumeRequestError, match="runs past the end"):
                    volume.write_from(offset, read_into)
                written = payload - offset
                model[offset:payload] = data[:written]
            assert volume.read(0, payload) == bytes(model)
    finally:
        datapath.CHUNK = original
    assert _reference_plain(image, key, 4096, 0) == bytes(model)


def test_ranges_are_checked(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    _make(image, sector=512, payload=8 * KIB)
    with LuksVolume.open(str(image), PASSPHRASE, writable=True) as volume:
        assert volume.payload_size == 8 * KIB
        assert volume.read(8 * KIB, 0) == b""
        for offset, length in [(-1, 1), (0, -1), (8 * KIB, 1), (1, 8 * KIB), (2**64, 0)]:
            with pytest.raises(VolumeRequestError):
                volume.read(offset, length)
            if length > 0:
                with pytest.raises(VolumeRequestError):
                    volume.write(offset, bytes(length))
        with pytest.raises(VolumeRequestError):
            volume.write_from(0, lambda view: 0, length=8 * KIB + 1)


def test_read_only_volumes_refuse_writes_and_close_wipes(tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    _make(image, sector=512, payload=8 * KIB, key_size=32)
    volume = LuksVolume.open(str(image), PASSPHRASE)
    key = volume.key
    with pytest.raises(ValueError, match="read-only"):
        volume.write(0, b"x")
    volume.close()
    assert key.closed
    with pytest.raises(ValueError, match="closed"):
        volume.read(0, 1)
    volume.close()  # twice is fine


@pytest.mark.parametrize("mappable", [True, False])
def test_large_reads_in_order_and_a_failing_sink_stops_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mappable: bool
) -> None:
    """Reads of many chunks (from a mapping of the device, or with pread where it cannot be mapped) come out
    whole and in order on several workers; a sink that fails stops every worker, and the error comes out."""
    monkeypatch.setattr(datapath, "CHUNK", 8 * KIB)
    image = tmp_path / "v.img"
    payload = 200 * KIB
    key = _make(image, sector=4096, payload=payload, iv_tweak=77)
    model = _reference_plain(image, key, 4096, 77)
    if not mappable:
        monkeypatch.setattr(Device, "map_range", lambda self, offset, length: None)
    for workers in (1, 2, 3):
        _read_in_order_then_fail(image, workers, payload, model)


def _read_in_order_then_fail(image: Path, workers: int, payload: int, model: bytes) -> None:
    with LuksVolume.open(str(image), PASSPHRASE) as volume:
        volume._sectors._workers = workers
        for offset, length in [(0, payload), (4095, 150 * KIB + 9), (8 * KIB - 1, 16 * KIB + 2)]:
            parts: list[bytes] = []
            progress: list[int] = []
            volume.read_to(offset, length, lambda view, into=parts: into.append(bytes(view)), progress.append)
            assert b"".join(parts) == model[offset : offset + length]
            assert progress == sorted(progress) and progress[-1] == length
        calls: list[int] = []

        def failing(view: memoryview) -> None:
            calls.append(view.nbytes)
            if len(calls) == 3:
                raise OSError(32, "Broken pipe")

        with pytest.raises(OSError, match="Broken pipe"):
            volume.read_to(0, payload, failing)
        assert len(calls) == 3, "no chunk is delivered after the failure"


@pytest.mark.parametrize(("sector", "iv_tweak"), [(512, 0), (4096, 77)])
def test_in_place_reads_and_writes_match_the_model_and_the_reference(
    tmp_path: Path, sector: int, iv_tweak: int
) -> None:
    """``read_into`` decrypts into the caller's buffer, ``write_in_place`` encrypts the caller's buffer itself
    (ciphertext afterwards, never the plaintext) and writes it; both agree with ``read``/``write``, the model
    and the reference cipher, from the page cache (``cached_only``) or not."""
    image = tmp_path / "v.img"
    payload = 64 * KIB
    key = _make(image, sector=sector, payload=payload, iv_tweak=iv_tweak)
    model = bytearray(_reference_plain(image, key, sector, iv_tweak))
    rng = random.Random(sector)
    with LuksVolume.open(str(image), PASSPHRASE, writable=True) as volume:
        for _ in range(20):
            offset = rng.randrange(0, payload // sector) * sector
            length = rng.randrange(1, (payload - offset) // sector + 1) * sector
            data = rng.randbytes(length)
            scratch = bytearray(data)
            volume.write_in_place(offset, memoryview(scratch))
            assert scratch != bytearray(data)  # encrypted where it lay
            model[offset : offset + length] = data
            view = memoryview(bytearray(length))
            assert volume.read_into(offset, view)
            assert view == data
            assert volume.read_into(offset, view, cached_only=True)  # just written: in the page cache
            assert view == data
            assert volume.read(offset, length) == data
    assert _reference_plain(image, key, sector, iv_tweak) == bytes(model)


def test_in_place_calls_refuse_partial_sectors_and_bad_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only whole sectors of at most a chunk, inside the payload: anything else is refused before any I/O
    (the callers fall back to ``read``/``write``), and ``aligned`` says so."""
    monkeypatch.setattr(datapath, "CHUNK", 16 * KIB)
    image = tmp_path / "v.img"
    _make(image, sector=4096, payload=64 * KIB)
    before = image.read_bytes()
    with LuksVolume.open(str(image), PASSPHRASE, writable=True) as volume:
        bad = [(0, 512), (512, 4096), (0, 4096 + 1), (0, 0), (0, 20 * KIB), (64 * KIB, 4096), (-4096, 4096),
               (60 * KIB, 8 * KIB)]  # fmt: skip
        for offset, length in bad:
            assert not volume.aligned(offset, length) or offset + length > 64 * KIB or offset < 0
            with pytest.raises(VolumeRequestError):
                volume.read_into(offset, memoryview(bytearray(length)))
            with pytest.raises(VolumeRequestError):
                volume.write_in_place(offset, memoryview(bytearray(length)))
        assert volume.aligned(4096, 16 * KIB)
    assert image.read_bytes() == before
    with LuksVolume.open(str(image), PASSPHRASE) as volume, pytest.raises(ValueError, match="read-only"):
        volume.write_in_place(0, memoryview(bytearray(4096)))


def test_cached_only_reads_refuse_what_is_not_in_the_page_cache(tmp_path: Path) -> None:
    """A read the page cache cannot serve whole (here: pages just dropped from it) is not done with
    ``cached_only``: False, so the proxy hands it to a worker thread rather than block its event loop."""
    import os

    image = tmp_path / "v.img"
    payload = 256 * KIB
    _make(image, sector=4096, payload=payload)
    with LuksVolume.open(str(image), PASSPHRASE) as volume:
        expected = volume.read(0, payload)
        fd = os.open(image, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        view = memoryview(bytearray(payload))
        if volume.read_into(0, view, cached_only=True):  # pragma: no cover - the kernel kept the pages
            pytest.skip("the page cache kept the pages despite POSIX_FADV_DONTNEED")
        assert volume.read_into(0, view)
        assert view == expected
        assert volume.read_into(0, view, cached_only=True)  # now cached
        assert view == expected
