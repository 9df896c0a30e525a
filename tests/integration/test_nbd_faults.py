"""Clients that break the protocol, requests the server must refuse, revocation, and a proxy SIGKILLed while
clients write. Each bad client gets the protocol's error or loses its connection, and a well-behaved
client connected alongside keeps being served."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keysteward.formats import nbd
from keysteward.proxy.export import LuksExport
from keysteward.volume import LuksVolume
from tests.support.nbd import (
    MIB,
    PASSPHRASE,
    NbdError,
    RawClient,
    ServerThread,
    client_context,
    make_pki,
    make_volume,
    server_context,
)

pytestmark = pytest.mark.integration

SIZE = 8 * MIB
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerThread, Path]]:
    image = make_volume(tmp_path / "vol.img", SIZE)
    ro = make_volume(tmp_path / "ro.img", MIB, sector=512)
    exports = {
        "vol": LuksExport.open("vol", str(image), PASSPHRASE),
        "ro": LuksExport.open("ro", str(ro), PASSPHRASE, read_only=True),
    }
    with ServerThread(exports, default_export="vol") as server:
        yield server, image


def _healthy(port: int) -> None:
    """A well-behaved client still gets its bytes back."""
    client = RawClient.connect(port)
    client.open("vol")
    client.write(4096, b"still here" * 10)
    assert client.read(4096, 100) == b"still here" * 10
    client.disconnect()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x08",  # a client flag the server never offered
        b"\x00\x00\x00\x03" + b"NOTMAGIC" + b"\x00" * 8,  # option without IHAVEOPT
        b"\x00\x00\x00\x03" + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 7) + b"missing",
    ],
)
def test_garbage_in_the_handshake_drops_only_that_client(served: tuple[ServerThread, Path], garbage: bytes) -> None:
    server, _ = served
    client = RawClient.connect(server.port)
    client.recv_exactly(nbd.GREETING_SIZE)
    client.send(garbage)
    assert client.closed_by_server()
    _healthy(server.port)


def test_stalled_and_vanished_handshakes_do_not_block_others(served: tuple[ServerThread, Path]) -> None:
    server, _ = served
    stalled = RawClient.connect(server.port)  # greets nothing back and stays
    vanished = RawClient.connect(server.port)
    vanished.recv_exactly(4)
    vanished.close()
    half = RawClient.connect(server.port)
    half.greet()
    half.send(nbd.encode_option(nbd.OPT_GO, nbd.encode_info_request("vol"))[:20])  # option cut short
    half.close()
    _healthy(server.port)
    stalled.close()


def test_option_errors(served: tuple[ServerThread, Path]) -> None:
    server, _ = served
    client = RawClient.connect(server.port)
    client.greet()
    assert client.option(99)[-1].reply == nbd.REP_ERR_UNSUP
    assert client.option(nbd.OPT_STARTTLS)[-1].reply == nbd.REP_ERR_UNSUP  # no TLS configured here
    assert client.option(nbd.OPT_GO, nbd.encode_info_request("nope"))[-1].reply == nbd.REP_ERR_UNKNOWN
    assert client.option(nbd.OPT_GO, b"\x00\x00\x10\x00ab")[-1].reply == nbd.REP_ERR_INVALID
    assert client.option(nbd.OPT_LIST, b"x")[-1].reply == nbd.REP_ERR_INVALID
    assert client.option(nbd.OPT_STRUCTURED_REPLY)[-1].reply == nbd.REP_ACK
    assert client.option(nbd.OPT_STRUCTURED_REPLY)[-1].reply == nbd.REP_ERR_INVALID
    listed = client.option(nbd.OPT_LIST)
    assert sorted(nbd.decode_server_entry(r.data)[0] for r in listed[:-1]) == ["ro", "vol"]
    infos = dict(nbd.decode_info(r.data) for r in client.option(nbd.OPT_INFO, nbd.encode_info_request("", (1,)))[:-1])
    assert infos[nbd.INFO_NAME] == "vol" and infos[nbd.INFO_EXPORT].size == SIZE  # the default export
    client.send(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 0xFFFFFFF0))  # 4 GiB of option data announced
    assert client.option_reply().reply == nbd.REP_ERR_TOO_BIG
    assert client.closed_by_server()
    _healthy(server.port)


def test_tls_is_mandatory_before_anything_else(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    export = LuksExport.open("vol", str(make_volume(tmp_path / "v.img", MIB)), PASSPHRASE)
    with ServerThread({"vol": export}, tls=server_context(pki)) as server:
        client = RawClient.connect(server.port)
        client.greet()
        for option in (nbd.OPT_LIST, nbd.OPT_STRUCTURED_REPLY, nbd.OPT_INFO, nbd.OPT_GO):
            data = nbd.encode_info_request("vol") if option in (nbd.OPT_INFO, nbd.OPT_GO) else b""
            assert client.option(option, data)[-1].reply == nbd.REP_ERR_TLS_REQD
        client.send(nbd.encode_option(nbd.OPT_EXPORT_NAME, b"vol"))  # has no error reply: dropped
        assert client.closed_by_server()
        injected = RawClient.connect(server.port)  # plaintext bytes queued behind STARTTLS are refused
        injected.greet()
        injected.send(nbd.encode_option(nbd.OPT_STARTTLS) + nbd.encode_option(nbd.OPT_GO, nbd.encode_info_request("")))
        assert injected.option_reply().reply == nbd.REP_ACK
        assert injected.closed_by_server()
        good = RawClient.connect(server.port)
        good.open("vol", tls=client_context(pki))
        good.write(0, b"tls" * 100)
        assert good.read(0, 300) == b"tls" * 100
        good.disconnect()


def test_an_export_that_does_not_name_the_client_is_hidden_and_refused(tmp_path: Path) -> None:
    """The client's certificate (host-1) is valid, but only "mine" names it: "theirs" is neither listed nor
    opened, by NBD_OPT_GO (the answer for a name that does not exist) or NBD_OPT_EXPORT_NAME (dropped)."""
    pki = make_pki(tmp_path / "pki")
    exports = {name: LuksExport.open(name, str(make_volume(tmp_path / f"{name}.img", MIB)), PASSPHRASE)
               for name in ("mine", "theirs")}  # fmt: skip
    refusals: list[tuple[str, str]] = []
    with ServerThread(exports, tls=server_context(pki), clients={"mine": ["host-1"], "theirs": ["host-2"]}) as server:
        server.server.on_refused = lambda export, reason: refusals.append((export, reason))
        client = RawClient.connect(server.port)
        client.greet()
        client.starttls(client_context(pki))
        listed = client.option(nbd.OPT_LIST)
        assert [nbd.decode_server_entry(r.data)[0] for r in listed[:-1]] == ["mine"]
        for option in (nbd.OPT_INFO, nbd.OPT_GO):
            assert client.option(option, nbd.encode_info_request("theirs"))[-1].reply == nbd.REP_ERR_UNKNOWN
            assert client.option(option, nbd.encode_info_request("nobody"))[-1].reply == nbd.REP_ERR_UNKNOWN
        client.send(nbd.encode_option(nbd.OPT_EXPORT_NAME, b"theirs"))
        assert client.closed_by_server()
        good = RawClient.connect(server.port)
        good.open("mine", tls=client_context(pki))
        good.write(0, b"mine" * 10)
        assert good.read(0, 40) == b"mine" * 10
        good.disconnect()
    assert refusals.count(("theirs", "not_allowed")) == 3 and refusals.count(("", "unknown_export")) == 2


def test_request_errors(served: tuple[ServerThread, Path]) -> None:
    server, _ = served
    client = RawClient.connect(server.port)
    client.open("vol")
    cases = [
        (nbd.CMD_READ, SIZE - 4096, 8192, 0, nbd.EINVAL),  # read past the end
        (nbd.CMD_WRITE, SIZE - 1, 2, 0, nbd.ENOSPC),  # write past the end
        (nbd.CMD_WRITE_ZEROES, SIZE, 4096, 0, nbd.ENOSPC),
        (nbd.CMD_TRIM, 1 << 62, 4096, 0, nbd.ENOSPC),
        (nbd.CMD_READ, 0, 32 * MIB + 1, 0, nbd.EOVERFLOW),  # longer than the maximum block
        (nbd.CMD_READ, 0, 0, 0, nbd.EINVAL),
        (nbd.CMD_BLOCK_STATUS, 0, 4096, 0, nbd.EINVAL),  # never negotiated
        (77, 0, 4096, 0, nbd.EINVAL),
        (nbd.CMD_READ, 0, 4096, 1 << 9, nbd.EINVAL),  # unknown flag
    ]
    for command, offset, length, flags, error in cases:
        payload = bytes(length) if command == nbd.CMD_WRITE else b""
        with pytest.raises(NbdError) as caught:
            client.call(command, offset, length, flags=flags, payload=payload)
        assert caught.value.error == error, (command, offset, length)
    assert client.read(SIZE - 10, 10) and client.read(0, 4096)  # the connection survived all of them
    client.disconnect()
    ro = RawClient.connect(server.port)
    ro.open("ro", structured=False)
    for command in (nbd.CMD_WRITE, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES):
        with pytest.raises(NbdError) as caught:
            ro.call(command, 0, 512, payload=bytes(512) if command == nbd.CMD_WRITE else b"")
        assert caught.value.error == nbd.EPERM
    assert len(ro.read(0, 512)) == 512  # simple replies carry the data
    ro.disconnect()


def test_oversized_write_bad_magic_and_a_cut_write_drop_the_connection(served: tuple[ServerThread, Path]) -> None:
    server, _ = served
    for attack in ("oversized", "magic", "cut"):
        client = RawClient.connect(server.port)
        client.open("vol")
        before = client.read(MIB, 65536)
        if attack == "oversized":
            client.send(nbd.encode_request(nbd.CMD_WRITE, 1, 0, 0xFFFFFFFF))
        elif attack == "magic":
            client.send(b"\x00" * nbd.REQUEST_SIZE)
        else:
            client.send(nbd.encode_request(nbd.CMD_WRITE, 1, MIB, 65536) + b"\xee" * 30000)
            client.sock.shutdown(2)
        if attack != "cut":
            assert client.closed_by_server()
        client.close()
        check = RawClient.connect(server.port)
        check.open("vol")
        assert check.read(MIB, 65536) == before  # a write never arrived whole, so nothing of it was applied
        check.disconnect()
    _healthy(server.port)


def test_concurrent_partial_sector_writes_all_land(served: tuple[ServerThread, Path]) -> None:
    """Pipelined 512-byte writes into the same 4096-byte sectors, on two connections at once: each one is a
    read-modify-write of a shared sector, and none may undo another."""
    server, _ = served
    clients = [RawClient.connect(server.port) for _ in range(2)]
    for c in clients:
        c.open("vol")
    writes = {i: bytes([i % 251 + 1]) * 512 for i in range(256)}

    def blast(k: int) -> None:
        c = clients[k]
        mine = [i for i in writes if i % 2 == k]
        for i in mine:
            c.request(nbd.CMD_WRITE, 2 * MIB + i * 512, 512, payload=writes[i])
        for _ in mine:
            assert c.reply()[1] == 0

    threads = [threading.Thread(target=blast, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert clients[0].read(2 * MIB, 256 * 512) == b"".join(writes[i] for i in range(256))
    for c in clients:
        c.disconnect()


def test_many_clients_at_once(served: tuple[ServerThread, Path]) -> None:
    server, _ = served
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            c = RawClient.connect(server.port)
            c.open("vol", structured=bool(k % 2))
            data = random.Random(k).randbytes(100_000)
            for _ in range(5):
                c.write(4 * MIB + k * 131072, data, fua=k == 0)
                assert c.read(4 * MIB + k * 131072, len(data)) == data
            c.flush()
            c.disconnect()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_revocation_drops_connections_and_wipes_the_key(tmp_path: Path) -> None:
    export = LuksExport.open("vol", str(make_volume(tmp_path / "v.img", MIB)), PASSPHRASE)
    other = LuksExport.open("other", str(make_volume(tmp_path / "o.img", MIB)), PASSPHRASE)
    with ServerThread({"vol": export, "other": other}) as server:
        client = RawClient.connect(server.port)
        client.open("vol")
        client.write(0, b"a" * 4096)
        bystander = RawClient.connect(server.port)
        bystander.open("other")
        server.call(lambda: server.server.close_export("vol", "revoked"))
        assert client.closed_by_server()
        assert export.closed and export.volume._key is None  # the locked buffer is gone
        late = RawClient.connect(server.port)
        late.greet()
        assert late.option(nbd.OPT_GO, nbd.encode_info_request("vol"))[-1].reply == nbd.REP_ERR_UNKNOWN
        late.close()
        assert bystander.read(0, 16) is not None  # the other export is untouched
        server.set_exports({})  # reload without "other": its connection ends after its requests, it is closed
        assert bystander.closed_by_server()
        deadline = time.monotonic() + 10
        while not other.closed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.closed
    with LuksVolume.open(str(tmp_path / "v.img"), PASSPHRASE) as volume:
        assert volume.read(0, 4096) == b"a" * 4096


def test_sigkill_keeps_every_flushed_write(tmp_path: Path) -> None:
    image = make_volume(tmp_path / "v.img", 64 * MIB)
    (tmp_path / "pw").write_bytes(PASSPHRASE)
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.nbd", "serve", "--export", f"vol={image}", "--passphrase-file",
         str(tmp_path / "pw"), "--port-file", str(port_file)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        client = RawClient.connect(int(port_file.read_text()))
        client.open("vol")
        rng = random.Random(7)
        flushed: dict[int, bytes] = {}
        pending: dict[int, bytes] = {}
        killer = threading.Timer(random.Random(8).uniform(0.3, 0.6), lambda: os.kill(proc.pid, signal.SIGKILL))
        killer.start()
        try:
            for i in range(100_000):
                data = rng.randbytes(rng.choice((512, 4096)))
                offset = i * 8192  # a slot of its own: no later write can legitimately cover a flushed one
                client.write(offset + rng.randrange(0, 4096), data)
                pending[offset] = data
                if i % 8 == 7:
                    client.flush()
                    flushed.update(pending)  # acknowledged by FLUSH: must survive
                    pending.clear()
                if offset + 16384 > 64 * MIB:
                    break
            cut_off = False
        except (ConnectionError, OSError):
            cut_off = True  # the kill came in the middle of the writing, as it should
        killer.join()
        assert cut_off, "the writes ended before the proxy was killed: kill earlier or write more"
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert flushed, "the proxy was killed before any flush"
    rng = random.Random(7)
    expected: list[tuple[int, bytes]] = []
    for i in range(len(flushed)):
        data = rng.randbytes(rng.choice((512, 4096)))
        offset = i * 8192
        expected.append((offset + rng.randrange(0, 4096), data))
    with LuksVolume.open(str(image), PASSPHRASE) as volume:
        for at, data in expected:
            assert volume.read(at, len(data)) == data, f"flushed write at {at} lost"
