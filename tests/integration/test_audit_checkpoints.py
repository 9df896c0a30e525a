"""Checkpoint sinks and the publisher against real peers: a file, a unix datagram socket, an HTTP server.

Each sink delivers what ``keysteward audit verify --checkpoint`` reads back; a sink that cannot deliver
raises ``audit_sink_failed`` and the publisher gives it the same heads in the next round. The publisher
runs over a real key manager (SQLite): a destroy publishes at once, a sealed server publishes nothing.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keysteward.audit import checkpoint
from keysteward.audit.publisher import CheckpointPublisher
from keysteward.audit.sinks import FileSink, SinkFailed, SyslogSink, WebhookSink, parse_sink
from keysteward.devcloud.provider import DevCloud
from keysteward.errors import BadRequest
from tests.fixtures.keysteward import Manager
from tests.integration.test_release_api import World

pytestmark = pytest.mark.integration

KEY = Ed25519PrivateKey.generate()
TS = "2025-06-01T12:00:00.000001+00:00"


def lines(n: int, tenant: str = "tenant-a") -> list[str]:
    return [checkpoint.encode(checkpoint.sign(KEY, tenant, seq, f"{seq:064x}", TS)) for seq in range(1, n + 1)]


# --- file --------------------------------------------------------------------------------------


def test_file_sink_appends_lines_that_read_back(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints.jsonl"
    sink = FileSink(path)
    sink.publish(lines(2))
    sink.publish([])
    sink.publish(lines(3)[2:])
    assert path.read_text().splitlines() == lines(3)
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(checkpoint.read(path.read_bytes().splitlines(), KEY.public_key(), "tenant-a")) == [1, 2, 3]


def test_file_sink_failure(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "missing-dir" / "cp.jsonl")
    with pytest.raises(SinkFailed) as info:
        sink.publish(lines(1))
    assert info.value.code == "audit_sink_failed" and "missing-dir" in info.value.message


# --- syslog ------------------------------------------------------------------------------------


@contextmanager
def syslog_socket(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def test_syslog_sink_to_a_unix_datagram_socket(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    with syslog_socket(path) as receiver:
        sink = parse_sink(f"syslog:{path}", tmp_path)
        assert isinstance(sink, SyslogSink)
        sink.publish(lines(2))
        got = [receiver.recv(4096) for _ in range(2)]
    sink.close()
    for raw, line in zip(got, lines(2), strict=True):
        # <PRI> with facility authpriv (10) and severity info (6): 10 * 8 + 6 = 86; then ident and the line
        assert raw == b"<86>keysteward-audit: " + line.encode()


def test_syslog_sink_reconnects_after_the_daemon_restarts(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    sink = SyslogSink(str(path))
    with pytest.raises(SinkFailed, match="syslog:"):  # nobody listens yet
        sink.publish(lines(1))
    with syslog_socket(path) as receiver:
        sink.publish(lines(1))
        assert receiver.recv(4096).endswith(lines(1)[0].encode())
    path.unlink()
    with syslog_socket(path) as receiver:  # a new socket at the same path, as a restarted syslogd makes
        sink.publish(lines(2)[1:])
        assert receiver.recv(4096).endswith(lines(2)[1].encode())
    sink.close()


def test_syslog_sink_over_udp() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    try:
        sink = parse_sink(f"syslog://127.0.0.1:{receiver.getsockname()[1]}", Path("/"))
        sink.publish(lines(1))
        assert receiver.recv(4096) == b"<86>keysteward-audit: " + lines(1)[0].encode()
        sink.close()
    finally:
        receiver.close()


# --- webhook -----------------------------------------------------------------------------------


@contextmanager
def webhook(status: list[int]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A real HTTP server that records each POST (content type, body) and answers ``status[0]``."""
    received: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            received.append((self.headers.get("content-type", ""), self.rfile.read(length)))
            self.send_response(status[0])
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook?token=s3cret", received
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_sink_posts_each_checkpoint_as_json() -> None:
    with webhook([204]) as (url, received):
        sink = parse_sink(url, Path("/"), webhook_timeout=5)
        assert isinstance(sink, WebhookSink)
        assert "s3cret" not in sink.label and "hook" not in sink.label
        sink.publish(lines(3))
        sink.close()
    assert [ctype for ctype, _ in received] == ["application/json"] * 3
    assert [checkpoint.parse(body) for _, body in received] == [checkpoint.parse(line) for line in lines(3)]


def test_webhook_sink_failures_name_no_credentials() -> None:
    status = [500]
    with webhook(status) as (url, received):
        sink = WebhookSink(url, timeout=5)
        with pytest.raises(SinkFailed) as info:
            sink.publish(lines(1))
        assert "answered 500" in info.value.message and "s3cret" not in info.value.message
        status[0] = 200
        sink.publish(lines(1))
        assert len(received) == 2
        sink.close()
    closed = WebhookSink(url, timeout=1)  # the server is gone now
    with pytest.raises(SinkFailed) as info:
        closed.publish(lines(1))
    assert "s3cret" not in info.value.message
    closed.close()


@pytest.mark.parametrize(
    "spec",
    ["", "file:", "ftp://h/x", "syslog:relative/sock", "syslog://:514", "syslog://h:99999", "https://", "x:y"],
)
def test_bad_sink_specs(spec: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_sink(spec, Path("/"))
    assert info.value.code == "bad_setting"


def test_bad_spec_never_echoes_credentials() -> None:
    with pytest.raises(BadRequest) as info:
        parse_sink("smtp://user:hunter2@mail/x", Path("/"))
    assert "hunter2" not in info.value.message


def test_relative_file_sink_is_under_the_data_dir(tmp_path: Path) -> None:
    sink = parse_sink("file:audit/cp.jsonl", tmp_path)
    assert isinstance(sink, FileSink) and sink.path == tmp_path / "audit" / "cp.jsonl"
    assert isinstance(parse_sink("file:///var/log/cp.jsonl", tmp_path), FileSink)


# --- the publisher over a real key manager ---------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def read_file(path: Path, tenant_id: str, manager: Manager) -> dict[int, checkpoint.Checkpoint]:
    if not path.exists():
        return {}
    return checkpoint.read(path.read_bytes().splitlines(), manager.svc.audit.public_key(), tenant_id)


@pytest.fixture
def sqlite_manager(manager_factory: Callable[..., Manager]) -> Manager:
    return manager_factory("")


def test_publisher_rounds_destroys_and_seal(sqlite_manager: Manager, tmp_path: Path) -> None:
    m = sqlite_manager
    path = tmp_path / "cp.jsonl"
    publisher = CheckpointPublisher(m.svc.audit, [FileSink(path)], interval=3600)
    admin = m.tenant("acme")
    tenant_id = m.svc.tenants.get("acme").id
    assert m.call(admin, "POST", "/v1/keys", json={"name": "k"}).status_code == 201

    # a round publishes every head once; an unchanged head is not published again
    assert publisher.publish_round() >= 2  # the system chain and acme's
    first = read_file(path, tenant_id, m)
    heads = {tenant: seq for tenant, seq, _ in m.svc.audit.heads()}
    assert max(first) == heads[tenant_id]
    assert publisher.publish_round() == 0

    # a destroy wakes the running thread, which publishes the head that includes the destroy record
    publisher.start()
    try:
        assert m.call(admin, "POST", "/v1/keys/k/rotate").status_code == 200
        r = m.call(admin, "POST", "/v1/keys/k/versions/1/destroy", json={"force": True})
        assert r.status_code == 200, r.text
        destroy_seq = next(
            link.seq for link in m.svc.audit.links(tenant_id) if '"action":"key.version.destroy"' in link.body
        )
        wait_for(lambda: max(read_file(path, tenant_id, m)) >= destroy_seq, timeout=5)
    finally:
        publisher.stop()

    # sealed: no key to sign with, nothing published; unsealing signs the heads that moved meanwhile
    sealed = CheckpointPublisher(m.svc.audit, [FileSink(tmp_path / "sealed.jsonl")], interval=3600)
    m.svc.root.seal()
    assert sealed.publish_round() == 0 and not (tmp_path / "sealed.jsonl").exists()
    m.svc.root.auto_unseal()
    assert sealed.publish_round() >= 2


def test_a_failing_sink_gets_the_heads_again(sqlite_manager: Manager, tmp_path: Path) -> None:
    m = sqlite_manager
    m.tenant("acme")
    good, bad_dir = tmp_path / "good.jsonl", tmp_path / "later"
    publisher = CheckpointPublisher(m.svc.audit, [FileSink(good), FileSink(bad_dir / "cp.jsonl")], interval=3600)
    took = publisher.publish_round()
    assert took >= 2 and publisher.failed == 1  # the good sink took them; the other failed
    assert publisher.publish_round() == 0 and publisher.failed == 2
    bad_dir.mkdir()
    assert publisher.publish_round() == took  # the failed sink gets every head it missed
    assert (bad_dir / "cp.jsonl").read_text() != ""


def test_publisher_refuses_a_bad_interval(sqlite_manager: Manager) -> None:
    for interval in (0.0, -1.0, 1e9):
        with pytest.raises(BadRequest):
            CheckpointPublisher(sqlite_manager.svc.audit, [], interval=interval)


def test_every_destroy_wakes_the_publisher(sqlite_manager: Manager, tmp_path: Path) -> None:
    """Key version, key and volume destroys each report their tenant and seq to the publisher's hook."""
    m = sqlite_manager
    seen: list[tuple[str, int]] = []
    m.svc.audit.on_destroy.append(lambda tenant, seq: seen.append((tenant, seq)))
    world = World(m, DevCloud.init(tmp_path / "devcloud"))
    tenant_id = m.svc.tenants.get("acme").id
    volume_id, _ = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    assert world.call("POST", f"/v1/volumes/{volume_id}/destroy", json={"reason": "test"}).status_code == 200
    assert world.call("POST", "/v1/keys", json={"name": "k"}).status_code == 201
    assert world.call("POST", "/v1/keys/k/rotate").status_code == 200
    assert world.call("POST", "/v1/keys/k/versions/1/destroy", json={"force": True}).status_code == 200
    assert world.call("POST", "/v1/keys/k/destroy").status_code == 200
    actions = {link.seq: json.loads(link.body)["action"] for link in m.svc.audit.links(tenant_id)}
    assert [actions[seq] for t, seq in seen if t == tenant_id] == [
        "volume.destroy",
        "key.version.destroy",
        "key.destroy",
    ]
