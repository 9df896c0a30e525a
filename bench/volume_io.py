"""Volume I/O through the real CLI: ``keysteward volume read/write`` against ``cat``, and ``volume check`` time.

    python bench/volume_io.py [--quick] [--size-mib N] [--rounds N] [--dir DIR]

Work: a LUKS2 volume (aes-xts-plain64, 512-bit key, 4096-byte sectors, pbkdf2 at 1,000 iterations)
whose payload has the size of a plain file of random bytes (1 GiB; ``--quick``: 256 MiB), both in
one temporary directory on the same file system. Every figure is the median of interleaved rounds
of whole processes (start-up included), measured in this run:

* ``volume_write``: ``keysteward volume write VOL --input PLAIN`` into a payload made sparse again
  before each round; reference: ``cat PLAIN > OTHER`` (a new file each round). Neither syncs: both
  hand the data to the kernel and exit. Both allocate the file's blocks as they write. Target: ratio >= 0.5.
* ``volume_write_fsync``: ``keysteward volume write --fsync`` against ``cat`` followed by an fsync of
  the copy (the same durability); context, no target.
* ``volume_read_warm``: ``keysteward volume read VOL > /dev/null`` with VOL in the page cache;
  reference: ``cat PLAIN > /dev/null`` with PLAIN cached. Target: ratio >= 0.5.
* ``volume_read_cold``: the same, each file dropped from the page cache before each round with
  ``posix_fadvise(DONTNEED)`` (clean pages only; no root needed; the host below may still cache).
  Target: ratio >= 0.5.
* ``volume_read_inprocess``: the data path alone (``LuksVolume.read_to`` into /dev/null, warm, no
  process start-up) against the warm ``cat``; context, no target.
* ``volume_check_ms``: ``keysteward volume check`` from process start to exit, median of 10 (quick: 7);
  reference: ``cryptsetup open --test-passphrase`` of the same volume. Target: value < 250 ms.

keysteward runs as installed: its modules' bytecode is compiled before the first round (``pip install``
of a wheel does that; an editable install under ``PYTHONDONTWRITEBYTECODE`` would compile every module
at every start). The readable lines say which files were cached. The last line is the machine-readable result:
``{"bench": "volume_io", "figures": [{"name", "value", "unit", "reference", "ratio", "target", "ok"}, ...]}``.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import BenchError, Cleanup, emit_json, keysteward_cli, make_temp_dir, ratio_figure, say

import keysteward
from keysteward.volume import LuksVolume

BENCH = "volume_io"
MIB = 1024 * 1024
DATA_OFFSET = 16 * MIB
TARGET_RATIO = 0.5
TARGET_CHECK_MS = 250.0
PASSPHRASE = b"bench volume passphrase"


def _evict(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (dirty ones are written first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(16 * MIB):
            pass


def _timed(argv: list[str], *, stdout: Any = subprocess.DEVNULL, stdin: Any = subprocess.DEVNULL) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, stdout=stdout, stdin=stdin, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} failed ({done.returncode}): {done.stderr.decode().strip()}")
    return elapsed


def _rounds(rounds: int, *measures: Callable[[], float]) -> list[list[float]]:
    """Interleave the measures ``rounds`` times; the times of each."""
    times: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for i, measure in enumerate(measures):
            times[i].append(measure())
    return times


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        view = view[os.write(fd, view) :]


def _make_plain(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        for _ in range(size // (16 * MIB)):
            fh.write(os.urandom(16 * MIB))
        fh.write(os.urandom(size % (16 * MIB)))


def _sha256_of_stream(argv: list[str]) -> str:
    digest = hashlib.sha256()
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(MIB):
            digest.update(chunk)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} failed ({proc.returncode})")
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(16 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, 5 rounds: under a minute")
    parser.add_argument("--size-mib", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where the files go (default: a new temporary directory)")
    args = parser.parse_args()
    size = (args.size_mib or (256 if args.quick else 1024)) * MIB
    rounds = args.rounds or (5 if args.quick else 7)
    check_runs = 7 if args.quick else 10
    cryptsetup = shutil.which("cryptsetup") or "/usr/sbin/cryptsetup"
    if not os.path.exists(cryptsetup):
        raise BenchError("cryptsetup is missing: apt-get install -y cryptsetup-bin (scripts/bootstrap.sh)")
    cli = [*keysteward_cli(), "volume"]
    compileall.compile_dir(str(Path(keysteward.__file__).parent), quiet=1)

    cleanup = Cleanup()
    work = make_temp_dir(cleanup, "ks-bench-volume-") if args.dir is None else Path(args.dir)
    plain, copy, volume, pw = work / "plain.bin", work / "copy.bin", work / "volume.img", work / "pw"
    pw.write_bytes(PASSPHRASE)
    say(f"volume_io: {size // MIB} MiB, {rounds} rounds, files in {work}")
    _make_plain(plain, size)
    subprocess.run([*cli, "create", str(volume), "--size", str(size), "--passphrase-file", str(pw), "--kdf",
                    "pbkdf2", "--pbkdf-iterations", "1000"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip

    # -- write ------------------------------------------------------------------------------------
    def cat_write() -> float:
        copy.unlink(missing_ok=True)
        os.sync()
        with copy.open("wb") as out:
            return _timed(["cat", str(plain)], stdout=out)

    def cat_write_fsync() -> float:
        copy.unlink(missing_ok=True)
        os.sync()
        with copy.open("wb") as out:
            started = time.perf_counter()
            _timed(["cat", str(plain)], stdout=out)
            os.fsync(out.fileno())
            return time.perf_counter() - started

    def volume_write(*extra: str) -> Callable[[], float]:
        def run() -> float:
            os.truncate(volume, DATA_OFFSET)  # the payload sparse again, as cat's new file is
            os.truncate(volume, DATA_OFFSET + size)
            os.sync()
            return _timed([*cli, "write", str(volume), "--passphrase-file", str(pw), "--input", str(plain), *extra])

        return run

    _warm(plain)
    cat_w, ks_w, cat_ws, ks_ws = _rounds(rounds, cat_write, volume_write(), cat_write_fsync, volume_write("--fsync"))
    copy.unlink(missing_ok=True)
    os.sync()
    if _sha256_of_stream([*cli, "read", str(volume), "--passphrase-file", str(pw)]) != _sha256(plain):
        raise BenchError("the volume does not read back what was written")
    say("write and read back: identical")

    # -- read ---------------------------------------------------------------------------------------
    def cat_read() -> float:
        return _timed(["cat", str(plain)])

    def volume_read() -> float:
        return _timed([*cli, "read", str(volume), "--passphrase-file", str(pw)])

    def cold(measure: Callable[[], float], path: Path) -> Callable[[], float]:
        def run() -> float:
            _evict(path)
            return measure()

        return run

    _warm(plain)
    _warm(volume)
    cat_warm, ks_warm = _rounds(rounds, cat_read, volume_read)
    cat_cold, ks_cold = _rounds(rounds, cold(cat_read, plain), cold(volume_read, volume))

    devnull = os.open(os.devnull, os.O_WRONLY)
    inproc: list[float] = []
    _warm(volume)
    with LuksVolume.open(str(volume), PASSPHRASE) as opened:
        for _ in range(rounds):
            started = time.perf_counter()
            opened.read_to(0, size, lambda view: _write_all(devnull, view))
            inproc.append(time.perf_counter() - started)
    os.close(devnull)

    # -- check --------------------------------------------------------------------------------------
    ks_check, cs_check = _rounds(
        check_runs,
        lambda: _timed([*cli, "check", str(volume), "--passphrase-file", str(pw)]),
        lambda: _timed([cryptsetup, "open", "--test-passphrase", "--key-file", str(pw), str(volume)]),
    )

    gb = size / 1e9

    def rate(times: list[float]) -> float:
        return gb / statistics.median(times)

    say(f"write, no fsync: keysteward {rate(ks_w):.2f} GB/s (median {statistics.median(ks_w):.3f} s), "
        f"cat {rate(cat_w):.2f} GB/s (median {statistics.median(cat_w):.3f} s); into new blocks")  # fmt: skip
    say(f"write with fsync: keysteward --fsync {rate(ks_ws):.2f} GB/s (median {statistics.median(ks_ws):.3f} s), "
        f"cat + fsync {rate(cat_ws):.2f} GB/s (median {statistics.median(cat_ws):.3f} s)")  # fmt: skip
    say(f"read, files in the page cache: keysteward {rate(ks_warm):.2f} GB/s "
        f"({statistics.median(ks_warm):.3f} s), cat {rate(cat_warm):.2f} GB/s "
        f"({statistics.median(cat_warm):.3f} s)")  # fmt: skip
    say(f"read, files dropped from the page cache (POSIX_FADV_DONTNEED): keysteward {rate(ks_cold):.2f} GB/s "
        f"({statistics.median(ks_cold):.3f} s), cat {rate(cat_cold):.2f} GB/s "
        f"({statistics.median(cat_cold):.3f} s)")  # fmt: skip
    say(f"read in process (data path only, cached): {rate(inproc):.2f} GB/s")
    check_ms, cs_ms = statistics.median(ks_check) * 1000, statistics.median(cs_check) * 1000
    say(f"volume check (pbkdf2, 1000 iterations), process start to exit: median {check_ms:.1f} ms "
        f"(min {min(ks_check) * 1000:.1f}, max {max(ks_check) * 1000:.1f}); cryptsetup open --test-passphrase "
        f"{cs_ms:.1f} ms")  # fmt: skip
    say(
        f"start-up is part of every keysteward figure: about {check_ms:.0f} ms of each read and write "
        "(bytecode compiled, as installed)"
    )

    figures = [
        ratio_figure("volume_write", rate(ks_w), "GB/s", rate(cat_w), TARGET_RATIO),
        ratio_figure("volume_write_fsync", rate(ks_ws), "GB/s", rate(cat_ws), None),
        ratio_figure("volume_read_warm", rate(ks_warm), "GB/s", rate(cat_warm), TARGET_RATIO),
        ratio_figure("volume_read_cold", rate(ks_cold), "GB/s", rate(cat_cold), TARGET_RATIO),
        ratio_figure("volume_read_inprocess", rate(inproc), "GB/s", rate(cat_warm), None),
        {
            "name": "volume_check_ms",
            "value": round(check_ms, 1),
            "unit": "ms",
            "reference": round(cs_ms, 1),
            "ratio": round(check_ms / cs_ms, 2) if cs_ms else None,
            "target": TARGET_CHECK_MS,
            "ok": check_ms < TARGET_CHECK_MS,
        },
    ]
    cleanup.run()
    emit_json(BENCH, figures)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"volume_io: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
