"""The ``streaming_aead`` figure of bench/vm_state.py: keysteward's streaming AEAD over data in memory against
one pyca AES-256-GCM call over the same bytes (the same run's reference), in GB per CPU-second of the measuring
thread, best of the rounds; Google's Tink over the same key, when installed, for the text lines only.

Not a bench itself: bench/vm_state.py is, and ends with its ``{"bench": "vm_state", "figures": [...]}`` line.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable
from typing import Any

from _common import BenchError, machine_cpu, ratio_figure, say
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keysteward.crypto import streaming_aead

AAD = b"tenant=bench vm=bench-vm snapshot=bench-snap"
CHUNK = 1 << 20


class NullSink(io.RawIOBase):
    """A writable file that drops what it is given (Tink's stream closes it: harmless)."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def best_gbps(label: str, fn: Callable[[], object], size: int, results: dict[str, tuple[float, float]]) -> None:
    """Run ``fn`` once; keep the best (GB per CPU-second of this thread, GB per wall second) under ``label``.

    The figure is the CPU-time rate: one core's throughput, not diluted when other processes take the
    core away (the machine is shared); the wall-clock rate is printed beside it."""
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    fn()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    best_cpu, best_wall = results.get(label, (0.0, 0.0))
    results[label] = (max(best_cpu, size / max(cpu, 1e-9) / 1e9), max(best_wall, size / wall / 1e9))


def tink_primitive(key: bytes) -> Any:
    """Tink's streaming AEAD over the same raw key (None when tink is not installed)."""
    try:
        from tink import cleartext_keyset_handle
        from tink import streaming_aead as tink_streaming
        from tink.proto import aes_gcm_hkdf_streaming_pb2 as pb
        from tink.proto import common_pb2, tink_pb2
    except ImportError:
        return None
    tink_streaming.register()
    params = pb.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=streaming_aead.SEGMENT_SIZE, derived_key_size=32, hkdf_hash_type=common_pb2.SHA256
    )
    data = tink_pb2.KeyData(
        type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
        value=pb.AesGcmHkdfStreamingKey(version=0, params=params, key_value=key).SerializeToString(),
        key_material_type=tink_pb2.KeyData.SYMMETRIC,
    )
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[tink_pb2.Keyset.Key(key_data=data, status=tink_pb2.ENABLED, key_id=1, output_prefix_type=tink_pb2.RAW)],
    )
    return cleartext_keyset_handle.from_keyset(keyset).primitive(tink_streaming.StreamingAead)


def measure_streaming_aead(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = args.size_mib << 20
    say(f"[streaming_aead] {args.size_mib} MiB of random data in memory, {args.rounds} rounds, best of each")
    key = os.urandom(32)
    data = os.urandom(size)
    held = io.BytesIO()
    streaming_aead.encrypt_stream(key, AAD, io.BytesIO(data), held)
    ours_ct = held.getvalue()
    del held
    nonce = os.urandom(12)
    gcm = AESGCM(key)
    oneshot_out = bytearray(size + 16)
    gcm.encrypt_into(nonce, data, AAD, oneshot_out)
    oneshot_ct = bytes(oneshot_out)
    oneshot_plain = bytearray(size)

    def verify_round_trip() -> None:
        out = io.BytesIO()
        streaming_aead.decrypt_stream(key, AAD, io.BytesIO(ours_ct), out)
        if out.getvalue() != data:
            raise BenchError("streaming_aead does not round-trip")

    verify_round_trip()
    fns: dict[str, Callable[[], object]] = {
        "ref_enc": lambda: gcm.encrypt_into(nonce, data, AAD, oneshot_out),
        "ref_dec": lambda: gcm.decrypt_into(nonce, oneshot_ct, AAD, oneshot_plain),
        "ours_enc": lambda: streaming_aead.encrypt_stream(key, AAD, io.BytesIO(data), NullSink()),
        "ours_dec": lambda: streaming_aead.decrypt_stream(key, AAD, io.BytesIO(ours_ct), NullSink()),
    }
    tink = tink_primitive(key)
    if tink is not None:
        tink_ct = _tink_encrypt(tink, data, io.BytesIO())
        if tink_ct != len(ours_ct):
            raise BenchError("tink's and our stream sizes differ")
        fns["tink_enc"] = lambda: _tink_encrypt(tink, data, NullSink())
        fns["tink_dec"] = lambda: _tink_decrypt(tink, ours_ct)  # Tink reads our stream: interop as well
    busy0, total0 = machine_cpu()
    results: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for label, fn in fns.items():
            best_gbps(label, fn, size, results)
    busy1, total1 = machine_cpu()
    cpus = os.cpu_count() or 1
    busy = (busy1 - busy0) / max(1.0, total1 - total0) * cpus
    say(f"  the machine's {cpus} CPUs were {busy:.2f} busy during the rounds (this bench keeps 1 busy)")
    for label, text in [
        ("ref_enc", "pyca AES-256-GCM one-shot encrypt"),
        ("ref_dec", "pyca AES-256-GCM one-shot decrypt"),
        ("ours_enc", "keysteward streaming encrypt"),
        ("ours_dec", "keysteward streaming decrypt"),
        ("tink_enc", "Tink streaming encrypt"),
        ("tink_dec", "Tink streaming decrypt (of our stream)"),
    ]:
        if label in results:
            cpu, wall = results[label]
            say(f"  {text:<44} {cpu:6.2f} GB/s per CPU-second ({wall:.2f} GB/s wall clock)")
    if tink is None:
        say("  tink is not installed (pip install -e '.[test]'): no Tink comparison")
    else:
        for op in ("enc", "dec"):
            ours, theirs = results[f"ours_{op}"][0], results[f"tink_{op}"][0]
            faster = "keysteward" if ours >= theirs else "Tink"
            say(f"  {op}: keysteward / Tink = {ours / theirs:.2f} ({faster} is faster)")
    return [
        ratio_figure("streaming_aead_encrypt_gbps", results["ours_enc"][0], "GB/s", results["ref_enc"][0], None),
        ratio_figure("streaming_aead_decrypt_gbps", results["ours_dec"][0], "GB/s", results["ref_dec"][0], None),
    ]


def _tink_encrypt(primitive: Any, data: bytes, sink: io.RawIOBase | io.BytesIO) -> int:
    view = memoryview(data)
    counter = _Counter(sink)
    with primitive.new_encrypting_stream(counter, AAD) as stream:
        for start in range(0, len(view), CHUNK):
            stream.write(view[start : start + CHUNK])
    return counter.count


def _tink_decrypt(primitive: Any, blob: bytes) -> int:
    total = 0
    with primitive.new_decrypting_stream(io.BytesIO(blob), AAD) as stream:
        while chunk := stream.read(CHUNK):
            total += len(chunk)
    return total


class _Counter(io.RawIOBase):
    def __init__(self, sink: io.RawIOBase | io.BytesIO) -> None:
        self.sink, self.count = sink, 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.count += len(b)
        self.sink.write(b)
        return len(b)
