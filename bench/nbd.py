"""The NBD proxy against nbdkit: nbdcopy sequential read and write, 4 KiB reads spread over the export.

    python bench/nbd.py [--quick] [--size-mib N] [--rounds N] [--dir DIR] [--python-plane]

Work: a file of random bytes (1 GiB; ``--quick``: 256 MiB), the same bytes in a LUKS2 volume
(aes-xts-plain64, 512-bit key, 4096-byte sectors) and in a LUKS1 volume (512-byte sectors, what
nbdkit's luks filter reads), all in one temporary directory, in the page cache. Servers, each its own
process on loopback TCP:

* keysteward: ``python -m tests.support.nbd serve`` (the proxy's NbdServer on uvloop, LuksExport; plaintext
  connections on the native data plane, or with ``--python-plane`` on the Python path, to compare);
* ``nbdkit file`` serving the plain file (and a plain copy target for writes): the reference;
* ``nbdkit --filter=luks file`` serving the LUKS1 volume (nbdkit's own decrypting filter, in C).

Figures (medians of interleaved rounds, loopback TCP *plaintext* unless named ``_tls``):

* ``seq_read``: ``nbdcopy nbd://... null:`` of the whole export, keysteward / nbdkit file. Target 0.8.
* ``seq_write``: ``nbdcopy PLAIN nbd://...`` (keysteward's volume, nbdkit's plain copy). Target 0.8.
* ``rand_read_4k``: ``qemu-img bench`` of 4 KiB reads, queue depth 16, each request a stride of 7919
  blocks from the last (modulo the size), so consecutive requests never touch neighbouring blocks. Target 0.6.
* ``seq_read_vs_luks_filter``: keysteward's seq_read against nbdkit's luks filter on the LUKS1 copy. Target 1.5.
* ``seq_read_tls`` / ``seq_write_tls``: both servers with TLS (X.509, client certificates). Target 0.8.

Targets are issue 15's; docs/proxy.md has the measurements and what the time goes into.

The last line is ``{"bench": "nbd", "figures": [...]}``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    REPO,
    BenchError,
    Cleanup,
    free_port,
    keysteward_cli,
    make_temp_dir,
    ratio_figure,
    report_figures,
    say,
)
from _common import stop_process as stop
from tests.support.nbd import PASSPHRASE, make_pki

BENCH = "nbd"
MIB = 1024 * 1024
STRIDE_BLOCKS = 7919


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise BenchError(f"{name} is missing: run `bash scripts/bootstrap.sh` (nbdkit, libnbd-bin, qemu-utils)")
    return found


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {port}")


def _start(cleanup: Cleanup, argv: list[str], port: int, what: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    cleanup.push(f"stop {what}", lambda: stop(proc))
    _wait_port(port, proc, what)
    return proc


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stderr.decode().strip()}")
    return elapsed


def _qemu_bench(url: str, count: int, size: int) -> float:
    """Seconds for ``count`` 4 KiB reads (qemu-img bench prints ``Run completed in X seconds.``)."""
    step = (STRIDE_BLOCKS * 4096) % (size - 4096)
    argv = [_tool("qemu-img"), "bench", "-f", "raw", "-c", str(count), "-d", "16", "-s", "4096", "-S", str(step), url]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    found = re.search(r"completed in ([\d.]+) seconds", done.stdout)
    if done.returncode != 0 or found is None:
        raise BenchError(f"qemu-img bench failed ({done.returncode}): {done.stderr.strip()} {done.stdout.strip()}")
    return float(found.group(1))


def _rounds(rounds: int, *measures: Callable[[], float]) -> list[float]:
    """Interleave the measures; the median time of each."""
    times: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for i, measure in enumerate(measures):
            times[i].append(measure())
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, 3 rounds: under a minute")
    parser.add_argument("--size-mib", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dir", default=None)
    parser.add_argument(
        "--python-plane", action="store_true", help="serve plaintext on the Python path, not the native data plane"
    )
    args = parser.parse_args()
    started = time.monotonic()
    size = (args.size_mib or (256 if args.quick else 1024)) * MIB
    rounds = args.rounds or (3 if args.quick else 5)
    count = 20000 if args.quick else 50000
    nbdkit, nbdcopy = _tool("nbdkit"), _tool("nbdcopy")
    cleanup = Cleanup()
    work = make_temp_dir(cleanup, "ks-bench-nbd-") if args.dir is None else Path(args.dir)
    plain, target, vol, luks1, pw = (work / n for n in ("plain.bin", "target.bin", "vol.img", "luks1.img", "pw"))
    pw.write_bytes(PASSPHRASE)
    say(f"nbd: {size // MIB} MiB exports, {rounds} rounds, loopback TCP, files in {work} (page cache)")
    with plain.open("wb") as fh:
        for _ in range(size // (16 * MIB)):
            fh.write(os.urandom(16 * MIB))
    with target.open("wb") as fh:
        fh.truncate(size)
    cli = [*keysteward_cli(), "volume"]
    fast = ["--passphrase-file", str(pw), "--kdf", "pbkdf2", "--pbkdf-iterations", "1000"]
    for image, extra in ((vol, []), (luks1, ["--luks1", "--sector-size", "512"])):
        subprocess.run([*cli, "create", str(image), "--size", str(size), *fast, *extra], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        subprocess.run([*cli, "write", str(image), "--passphrase-file", str(pw), "--input", str(plain)], check=True)
    vol_tls = work / "vol-tls.img"  # a writable volume is locked by the one process that serves it
    shutil.copy(vol, vol_tls)
    pki = make_pki(work / "pki")
    server_dir = work / "pki" / "nbdkit"
    server_dir.mkdir()
    shutil.copy(pki.ca_cert, server_dir / "ca-cert.pem")
    shutil.copy(pki.server_cert, server_dir / "server-cert.pem")
    shutil.copy(pki.server_key, server_dir / "server-key.pem")
    tls_arg = ",".join(str(p) for p in (pki.ca_cert, pki.server_cert, pki.server_key, pki.client_dir))

    ports = {k: free_port() for k in ("ks", "ks_tls", "file", "file_w", "file_tls", "file_w_tls", "luks")}
    serve = [sys.executable, "-m", "tests.support.nbd", "serve", "--passphrase-file", str(pw)]
    serve += ["--python-plane"] if args.python_plane else []
    _start(cleanup, [*serve, "--export", f"vol={vol}", "--port", str(ports["ks"]), "--port-file", str(work / "p1")],
           ports["ks"], "keysteward")  # fmt: skip
    _start(cleanup, [*serve, "--export", f"vol={vol_tls}", "--port", str(ports["ks_tls"]), "--port-file",
                     str(work / "p2"), "--tls", tls_arg], ports["ks_tls"], "keysteward (TLS)")  # fmt: skip
    tls = ["--tls=require", f"--tls-certificates={server_dir}", "--tls-verify-peer"]
    for key, file, extra in (("file", plain, []), ("file_w", target, []), ("file_tls", plain, tls),
                             ("file_w_tls", target, tls)):  # fmt: skip
        _start(cleanup, [nbdkit, "-f", "-p", str(ports[key]), *extra, "file", str(file)], ports[key], f"nbdkit {key}")
    _start(cleanup, [nbdkit, "-f", "-p", str(ports["luks"]), "--filter=luks", "file", str(luks1),
                     f"passphrase=+{pw}"], ports["luks"], "nbdkit luks")  # fmt: skip

    def url(key: str, name: str = "") -> str:
        if key.endswith("tls"):
            return f"nbds://localhost:{ports[key]}/{name}?tls-certificates={pki.client_dir}"
        return f"nbd://127.0.0.1:{ports[key]}/{name}"

    def read(u: str) -> Callable[[], float]:
        return lambda: _timed([nbdcopy, u, "null:"])

    def write(u: str) -> Callable[[], float]:
        return lambda: _timed([nbdcopy, str(plain), u])

    ks_r, file_r, luks_r = _rounds(rounds, read(url("ks", "vol")), read(url("file")), read(url("luks")))
    ks_w, file_w = _rounds(rounds, write(url("ks", "vol")), write(url("file_w")))
    if _sha(plain) != _sha_nbd(nbdcopy, url("ks", "vol")):
        raise BenchError("the keysteward export does not read back what nbdcopy wrote")
    say("write through keysteward and read back: identical")
    ks_4k, file_4k = _rounds(rounds, lambda: _qemu_bench(url("ks", "vol"), count, size),
                             lambda: _qemu_bench(url("file"), count, size))  # fmt: skip
    ks_rt, file_rt = _rounds(rounds, read(url("ks_tls", "vol")), read(url("file_tls")))
    ks_wt, file_wt = _rounds(rounds, write(url("ks_tls", "vol")), write(url("file_w_tls")))

    gb = size / 1e9

    def rate(seconds: float) -> float:
        return gb / seconds

    iops = (count / ks_4k, count / file_4k)
    say(f"seq read (nbdcopy -> null:): keysteward {rate(ks_r):.2f} GB/s, nbdkit file {rate(file_r):.2f} GB/s, "
        f"nbdkit luks filter {rate(luks_r):.2f} GB/s")  # fmt: skip
    say(f"seq write (nbdcopy file -> nbd): keysteward {rate(ks_w):.2f} GB/s, nbdkit file {rate(file_w):.2f} GB/s")
    say(f"4 KiB reads (qemu-img bench, depth 16): keysteward {iops[0]:,.0f}/s, nbdkit file {iops[1]:,.0f}/s")
    say(f"TLS: seq read keysteward {rate(ks_rt):.2f} GB/s, nbdkit {rate(file_rt):.2f} GB/s; "
        f"seq write keysteward {rate(ks_wt):.2f} GB/s, nbdkit {rate(file_wt):.2f} GB/s")  # fmt: skip
    figures = [
        ratio_figure("seq_read", rate(ks_r), "GB/s", rate(file_r), 0.8),
        ratio_figure("seq_write", rate(ks_w), "GB/s", rate(file_w), 0.8),
        ratio_figure("rand_read_4k", iops[0], "IOPS", iops[1], 0.6),
        ratio_figure("seq_read_vs_luks_filter", rate(ks_r), "GB/s", rate(luks_r), 1.5),
        ratio_figure("seq_read_tls", rate(ks_rt), "GB/s", rate(file_rt), 0.8),
        ratio_figure("seq_write_tls", rate(ks_wt), "GB/s", rate(file_wt), 0.8),
    ]
    cleanup.run()
    report_figures(BENCH, figures, started, widths=(26, 5))


def _sha(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(16 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _sha_nbd(nbdcopy: str, url: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with subprocess.Popen([nbdcopy, url, "-"], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(MIB):
            digest.update(chunk)
    if proc.returncode != 0:
        raise BenchError(f"nbdcopy {url} - failed ({proc.returncode})")
    return digest.hexdigest()


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"nbd: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
