"""AES-XTS data path throughput: keysteward.crypto.xts against one-shot OpenSSL XTS, same process.

    python bench/xts.py [--quick] [--size-mib N] [--key-bits 512|256]

Work: a buffer of random data (16 MiB by default) in 4096-byte sectors with LUKS2's tweaks (each
sector advances the 512-byte-unit tweak by 8), AES-256-XTS (LUKS2's default 512-bit key).

* reference ceiling: ONE pyca/cryptography XTS call over the whole buffer (one tweak, one data unit),
  measured in this run. OpenSSL caps an XTS data unit at 2^20 blocks (16 MiB), hence the default
  size. pyca ships its own OpenSSL build, which may differ from the system libcrypto the native
  path links; the readable lines show both versions and the system library's own one-shot speed.
* ``xts_encrypt_1thread`` / ``xts_decrypt_1thread``: XtsCipher.encrypt/decrypt over the whole
  buffer on one thread; ratio = throughput / reference; target: ratio >= 0.6.
* ``xts_encrypt_2threads_speedup`` / ``xts_decrypt_2threads_speedup``: two threads, each with its
  own XtsCipher and its own half of the buffer; value = their combined throughput, reference = the
  1-thread throughput, ratio = the speedup; target: ratio >= 1.6.
* ``xts_naive_reference``: the per-sector pyca path (one Cipher per sector), for context only.

Figures compare steady-state calls that write into buffers allocated beforehand on both sides
(``out=`` here, ``update_into`` for pyca), the way a volume data path runs; the allocating forms
(new bytes per call) are printed for context. Each figure is the best of several interleaved rounds.
Targets apply to ``ratio``.

The last line is the machine-readable result:
``{"bench": "xts", "figures": [{"name", "value", "unit", "reference", "ratio", "target", "ok"}, ...]}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from _common import emit_json, machine_cpu, process_cpu_seconds, ratio_figure, say
from cryptography.hazmat.backends.openssl.backend import backend as pyca_backend
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keysteward.crypto import xts
from keysteward.crypto.xts_reference import encrypt_sectors_reference

BENCH = "xts"
SECTOR = 4096
TARGET_1THREAD_RATIO = 0.6
TARGET_2THREAD_SPEEDUP = 1.6


@dataclass
class Measure:
    """A callable timed in rounds of ``calls`` calls; keeps the best throughput seen."""

    label: str
    fn: Callable[[], object]
    bytes_per_call: int
    calls: int
    best: float = 0.0

    def round(self) -> None:
        start = time.perf_counter()
        for _ in range(self.calls):
            self.fn()
        elapsed = time.perf_counter() - start
        self.best = max(self.best, self.bytes_per_call * self.calls / elapsed / 1e9)


class Pair:
    """Two worker threads, each running its own callable once per round, started together."""

    def __init__(self, fns: list[Callable[[], object]], calls: int) -> None:
        self._fns = fns
        self._calls = calls
        self._go = threading.Barrier(len(fns) + 1)
        self._done = threading.Barrier(len(fns) + 1)
        self._stop = False
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._work, args=(fn,), daemon=True) for fn in fns]
        for t in self._threads:
            t.start()

    def _work(self, fn: Callable[[], object]) -> None:
        while True:
            self._go.wait()
            if self._stop:
                return
            try:
                for _ in range(self._calls):
                    fn()
            except BaseException as exc:  # surfaced by run() on the main thread
                self._errors.append(exc)
            self._done.wait()

    def run(self) -> None:
        self._go.wait()
        self._done.wait()
        if self._errors:
            raise RuntimeError(f"worker failed: {self._errors[0]!r}") from self._errors[0]

    def close(self) -> None:
        self._stop = True
        self._go.wait()
        for t in self._threads:
            t.join(10)


def distinct_halves_key(size: int) -> bytes:
    while True:
        key = os.urandom(size)
        if key[: size // 2] != key[size // 2 :]:
            return key


def native_oneshot(key: bytes, src: bytes, dst: bytearray, encrypt: bool) -> Callable[[], object] | None:
    """The system library's own one-shot XTS over the whole buffer (one data unit), for context."""
    module = xts.native_module()
    if module is None:
        return None
    ffi, lib = module.ffi, module.lib
    slot = ffi.new("ks_xts **")
    if lib.ks_xts_new(key, len(key), slot) != 0:
        return None
    handle = ffi.gc(slot[0], lib.ks_xts_free)
    src_ptr, dst_ptr = ffi.from_buffer(src), ffi.from_buffer(dst)
    if lib.ks_xts_crypt(handle, 1 if encrypt else 0, src_ptr, dst_ptr, 1, len(src), 0, 0) != 0:
        return None  # e.g. OpenSSL refuses data units over 2^20 blocks

    def call() -> object:
        return lib.ks_xts_crypt(handle, 1 if encrypt else 0, src_ptr, dst_ptr, 1, len(src), 0, 0)

    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (well under 60 s)")
    parser.add_argument("--size-mib", type=int, default=16, help="buffer size in MiB, 1 to 16 (default 16)")
    parser.add_argument("--key-bits", type=int, choices=(256, 512), default=512, help="XTS key size (default 512)")
    args = parser.parse_args()

    if not 1 <= args.size_mib <= 16:
        parser.error("--size-mib must be 1 to 16: OpenSSL refuses one XTS data unit over 2^20 blocks (16 MiB)")
    size = args.size_mib << 20
    # many short interleaved rounds, best kept: other work on the machine hits some rounds, not all
    rounds = 8 if args.quick else 30
    target_round_s = 0.03 if args.quick else 0.06

    say(f"bench xts: {size >> 20} MiB of {SECTOR}-byte sectors, AES-{args.key_bits // 2}-XTS, {os.cpu_count()} CPUs")
    say(f"  load average at start: {os.getloadavg()[0]:.2f}")
    say(f"  pyca/cryptography one-shot runs on: {pyca_backend.openssl_version_text()}")
    say(f"  native path: {'built, on ' + str(xts.native_backend()) if xts.native_available() else 'NOT BUILT'}")

    key = distinct_halves_key(args.key_bits // 8)
    data = os.urandom(size)
    half = size // 2
    first_sector = 8 * 1_000_003  # LUKS2-like: 512-byte units, a payload offset

    # -- the ceiling: one pyca XTS call over the whole buffer ----------------------------------
    pyca = Cipher(algorithms.AES(key), modes.XTS(first_sector.to_bytes(16, "little")))
    pyca_out = bytearray(size + 15)  # update_into wants block_size - 1 spare bytes
    ciphertext = pyca.encryptor().update(data)  # something to decrypt (the bytes do not matter for speed)

    def ref_enc() -> object:
        return pyca.encryptor().update_into(data, pyca_out)

    def ref_dec() -> object:
        return pyca.decryptor().update_into(ciphertext, pyca_out)

    def ref_enc_alloc() -> object:
        return pyca.encryptor().update(data)

    # -- ours ----------------------------------------------------------------------------------
    one = xts.XtsCipher(key, SECTOR)
    out = bytearray(size)
    halves_in = [memoryview(data)[:half], memoryview(data)[half:]]
    halves_ct = [memoryview(ciphertext)[:half], memoryview(ciphertext)[half:]]
    halves_out = [memoryview(out)[:half], memoryview(out)[half:]]
    second_half_sector = first_sector + (half // SECTOR) * (SECTOR // 512)
    firsts = [first_sector, second_half_sector]
    workers = [xts.XtsCipher(key, SECTOR), xts.XtsCipher(key, SECTOR)]

    # correctness before speed: the threaded halves must give the single-call bytes
    whole = bytes(one.encrypt(data, first_sector))
    parts = b"".join(bytes(workers[i].encrypt(halves_in[i], firsts[i])) for i in range(2))
    if whole != parts or one.decrypt(whole, first_sector) != data:
        raise SystemExit("bench xts: the data path gave inconsistent bytes; refusing to time it")
    if not xts.native_available():
        say("  WARNING: the native path is not built; timing the pyca fallback")

    def our_enc() -> object:
        return one.encrypt(data, first_sector, out=out)

    def our_dec() -> object:
        return one.decrypt(ciphertext, first_sector, out=out)

    def our_enc_alloc() -> object:
        return one.encrypt(data, first_sector)

    def worker_fn(i: int, encrypt: bool) -> Callable[[], object]:
        c, src, dst, first = workers[i], (halves_in if encrypt else halves_ct)[i], halves_out[i], firsts[i]
        if encrypt:
            return lambda: c.encrypt(src, first, out=dst)
        return lambda: c.decrypt(src, first, out=dst)

    # calibrate calls per round from one timed call of the slower single-thread path
    start = time.perf_counter()
    our_enc()
    per_call = max(time.perf_counter() - start, 1e-4)
    calls = max(2, int(target_round_s / per_call))

    pairs = {enc: Pair([worker_fn(0, enc), worker_fn(1, enc)], calls) for enc in (True, False)}
    measures = {
        "ref_enc": Measure("one-shot pyca encrypt (update_into)", ref_enc, size, calls * 2),
        "ref_dec": Measure("one-shot pyca decrypt (update_into)", ref_dec, size, calls * 2),
        "enc_1": Measure("XtsCipher.encrypt, 1 thread, out=", our_enc, size, calls),
        "dec_1": Measure("XtsCipher.decrypt, 1 thread, out=", our_dec, size, calls),
        # one Pair.run = `calls` calls on each thread, each over half the buffer
        "enc_2": Measure("XtsCipher.encrypt, 2 threads, out=", pairs[True].run, size * calls, 1),
        "dec_2": Measure("XtsCipher.decrypt, 2 threads, out=", pairs[False].run, size * calls, 1),
        "ref_enc_alloc": Measure("one-shot pyca encrypt (update, new bytes)", ref_enc_alloc, size, calls * 2),
        "enc_1_alloc": Measure("XtsCipher.encrypt, 1 thread, new bytes", our_enc_alloc, size, calls),
    }
    system_dst = bytearray(size)
    system = native_oneshot(key, data, system_dst, True)
    if system is not None:
        measures["sys_enc"] = Measure("one-shot system-library encrypt (context)", system, size, calls)

    busy0, total0 = machine_cpu()
    own0 = process_cpu_seconds([os.getpid()])
    wall0 = time.monotonic()
    for _ in range(rounds):  # interleaved, so drift in machine load hits every figure alike
        for m in measures.values():
            m.round()
    busy1, total1 = machine_cpu()
    own_s = process_cpu_seconds([os.getpid()]) - own0
    wall_s = time.monotonic() - wall0
    cpus = os.cpu_count() or 1
    # CPU the rest of the machine used while we measured (in CPUs): 2 threads need 2 idle ones
    others = max(0.0, (busy1 - busy0) / max(total1 - total0, 1.0) * cpus - own_s / wall_s)
    for pair in pairs.values():
        pair.close()

    naive_size = (256 if args.quick else 1024) * 1024
    naive_data = data[:naive_size]
    naive = Measure(
        "naive reference: one pyca Cipher per sector",
        lambda: encrypt_sectors_reference(key, SECTOR, naive_data, first_sector),
        naive_size,
        2,
    )
    for _ in range(2 if args.quick else 4):
        naive.round()

    say("")
    for m in [*measures.values(), naive]:
        say(f"  {m.label:<48} {m.best:7.2f} GB/s")
    say("")
    gb = {k: m.best for k, m in measures.items()}
    enc_ratio, dec_ratio = gb["enc_1"] / gb["ref_enc"], gb["dec_1"] / gb["ref_dec"]
    say(f"  1 thread vs one-shot:   encrypt {enc_ratio:.2f}, decrypt {dec_ratio:.2f}")
    say(f"  2 threads vs 1 thread:  encrypt {gb['enc_2'] / gb['enc_1']:.2f}x, decrypt {gb['dec_2'] / gb['dec_1']:.2f}x")
    say(f"  allocating forms:       {gb['enc_1_alloc'] / gb['ref_enc_alloc']:.2f} of pyca's update()")
    if "sys_enc" in gb:
        say(f"  vs the system library's own one-shot: {gb['enc_1'] / gb['sys_enc']:.2f}")
    say(f"  other processes used {others:.2f} of {cpus} CPUs while the rounds ran (2-thread figures need 2 free)")
    say(f"  load average at end: {os.getloadavg()[0]:.2f}")

    figures = [
        ratio_figure("xts_encrypt_1thread", gb["enc_1"], "GB/s", gb["ref_enc"], TARGET_1THREAD_RATIO),
        ratio_figure("xts_decrypt_1thread", gb["dec_1"], "GB/s", gb["ref_dec"], TARGET_1THREAD_RATIO),
        ratio_figure("xts_encrypt_2threads_speedup", gb["enc_2"], "GB/s", gb["enc_1"], TARGET_2THREAD_SPEEDUP),
        ratio_figure("xts_decrypt_2threads_speedup", gb["dec_2"], "GB/s", gb["dec_1"], TARGET_2THREAD_SPEEDUP),
        ratio_figure("xts_naive_reference", naive.best, "GB/s", gb["ref_enc"], None),
    ]
    emit_json(BENCH, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
