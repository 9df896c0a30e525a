"""``keysteward proxy serve`` end to end: a real key manager process, a real proxy process, real NBD clients.

- a ``kms`` export opens by a release as a host (the proxy's mTLS certificate, no identity document); qemu-io
  writes through NBD over TLS (client certificate required) and ``keysteward volume read`` reads the bytes back
  from the volume file with the break-glass passphrase; the metrics endpoint counts them;
- ``keysteward volume revoke``: at its next renewal (1 s) the proxy drops that export: the connected client's
  next request fails, the export leaves ``--list``, and the other export goes on serving the same client set;
- SIGHUP with an edited config adds and removes exports; a connection to an export that stays keeps working
  (same qemu-io process, same NBD connection); a config that does not load is refused and the old one kept;
- SIGTERM: clean stop, exit 0, what was written is on the volume;
- ``keysteward proxy check``: ok for a good config, one line and exit 1 for a bad one.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keysteward.agent.kms_volume import KmsVolumeSpec, create_kms_volume
from keysteward.crypto import x509ca, x509csr
from keysteward.volume.create import CreateOptions
from keysteward.volume.kdf import KdfChoice
from keysteward.volume.luks_volume import LuksVolume
from tests.fixtures.keysteward import KEYSTEWARD, SecretRegistry, ServerProcess, init_manager
from tests.support.daemons import Daemon, reaped
from tests.support.tools import tool

pytestmark = pytest.mark.e2e
MIB = 1024 * 1024
HOST = "proxy-1"
BREAK_GLASS = b"proxy break-glass passphrase"
QEMU_OK = re.compile(r"(read|wrote) \d+/\d+ bytes")
QEMU_FAILED = re.compile(r"failed|error|Error")


# -- the world: a key manager, a tenant CA, the proxy's certificates ----------------------------------------


@dataclass
class Site:
    server: ServerProcess
    admin: str
    registry: SecretRegistry
    tmp: Path
    host_cert: str
    host_key: str
    tls_cert: str
    tls_key: str
    client_ca: str
    client_dir: str
    """qemu's and libnbd's layout: ca-cert.pem, client-cert.pem, client-key.pem (the client ``vm-1``)."""
    other_client_dir: str
    """The same for ``vm-2``: another guest's certificate from the same CA."""

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def kms_ca(self) -> str:
        return str(self.server.settings.server.tls_ca)

    def admin_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self.server.http(self.admin) as c:
            r = c.request(method, path, json=body)
        assert r.status_code < 300, r.text
        return r.json() if r.content else None

    def kms_volume(self, name: str, *, renew_seconds: int = 1, lease_seconds: int = 20) -> tuple[Path, str]:
        """A volume bound to the proxy's host, with a break-glass passphrase keyslot; ``(path, volume id)``."""
        path = self.tmp / f"{name}.img"
        made = create_kms_volume(
            str(path),
            KmsVolumeSpec(
                url=self.url,
                key="volumes",
                host=HOST,
                name=name,
                lease_seconds=lease_seconds,
                renew_seconds=renew_seconds,
            ),
            CreateOptions(size=4 * MIB),
            admin_token=self.admin,
            ca_file=self.kms_ca,
            break_glass=bytearray(BREAK_GLASS),
            break_glass_kdf=KdfChoice(type="pbkdf2", iterations=1000),
        )
        self.registry.secret(volume_key(path), f"volume key of {name}")
        return path, str(made["volume"]["id"])


def volume_key(path: Path) -> bytes:
    with LuksVolume.open(str(path), BREAK_GLASS) as vol:
        return vol.export_volume_key()


def passphrase_volume(tmp: Path, name: str, passphrase: bytes = BREAK_GLASS) -> tuple[Path, Path]:
    """A LUKS2 volume opened by a passphrase file (the break-glass key source); ``(volume, passphrase file)``."""
    path, pass_file = tmp / f"{name}.img", tmp / f"{name}.pass"
    pass_file.write_bytes(passphrase)
    subprocess.run(
        [KEYSTEWARD, "volume", "create", str(path), "--size", "4M", "--passphrase-file", str(pass_file),
         "--kdf", "pbkdf2", "--pbkdf-iterations", "1000"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return path, pass_file


def _write(path: Path, data: str | bytes | bytearray) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else bytes(data))
    return str(path)


def make_site(tmp: Path, server_factory: Callable[..., ServerProcess], registry: SecretRegistry) -> Site:
    out = init_manager(tmp / "ks", registry)
    server = server_factory(tmp / "ks")
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    with server.http(admin) as c:
        assert c.post("/keys", json={"name": "volumes"}).status_code < 300
        assert c.post("/ca/init").status_code == 201
        host_key_pem, csr = x509csr.make_csr("acme", "host", HOST)
        issued = c.post("/ca/issue", json={"name": HOST, "role": "host", "csr_pem": csr.decode()})
        assert issued.status_code == 201, issued.text
    host_cert = _write(tmp / "host.pem", issued.json()["cert_pem"])
    host_key = _write(tmp / "host.key", bytes(host_key_pem).decode())
    # the NBD side: the proxy's server certificate and the clients' CA (a CA of the tenant's own)
    ca_pem, ca_key = x509ca.new_ca("acme nbd clients")
    served = x509ca.issue_server_cert(ca_pem, ca_key, hostnames=["localhost"], ips=["127.0.0.1"])
    assert served.key_pem is not None
    client_dirs = []
    for name in ("vm-1", "vm-2"):
        client = x509ca.issue_client_cert(ca_pem, ca_key, tenant="acme", role="agent", name=name)
        assert client.key_pem is not None
        client_dir = tmp / f"nbd-client-{name}"
        client_dir.mkdir()
        _write(client_dir / "ca-cert.pem", ca_pem)
        _write(client_dir / "client-cert.pem", client.cert_pem)
        _write(client_dir / "client-key.pem", client.key_pem)
        client_dirs.append(str(client_dir))
    tls_cert, tls_key = _write(tmp / "nbd-server.pem", served.cert_pem), _write(tmp / "nbd-server.key", served.key_pem)
    client_ca = _write(tmp / "nbd-client-ca.pem", ca_pem)
    return Site(server, admin, registry, tmp, host_cert, host_key, tls_cert, tls_key, client_ca, *client_dirs)


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> Site:
    return make_site(tmp_path, server_factory, secret_registry)


# -- the proxy process ------------------------------------------------------------------------------------


VM1 = "keysteward:acme/agent/vm-1"
VM2 = "keysteward:acme/agent/vm-2"
"""The identity URIs of the two NBD client certificates (Site.client_dir, Site.other_client_dir)."""


def export_toml(
    name: str, path: Path, *, pass_file: Path | None = None, read_only: bool = False, clients: tuple[str, ...] = ()
) -> str:
    """One ``[[exports]]`` table; ``clients`` (needed with TLS) names who may open it."""
    source = f'passphrase_file = "{pass_file}"' if pass_file else "kms = true"
    allowed = f"clients = {json.dumps(list(clients))}\n" if clients else ""
    return f'[[exports]]\nname = "{name}"\npath = "{path}"\nread_only = {str(read_only).lower()}\n{source}\n{allowed}'


def tls_toml(site: Site) -> str:
    return (
        f'[listen]\naddress = "127.0.0.1"\nport = 0\n'
        f'[tls]\ncert_file = "{site.tls_cert}"\nkey_file = "{site.tls_key}"\nclient_ca_file = "{site.client_ca}"\n'
        f'[kms]\nca_file = "{site.kms_ca}"\ncert_file = "{site.host_cert}"\nkey_file = "{site.host_key}"\ntimeout = 5\n'
    )


PLAINTEXT = '[listen]\naddress = "127.0.0.1"\nport = 0\nallow_plaintext = true\n'


class ProxyProcess(Daemon):
    """``keysteward proxy serve`` with its config, status file and JSON log in ``tmp``."""

    name = "proxy"

    def __init__(self, tmp: Path, head: str, exports: list[str], registry: SecretRegistry) -> None:
        self.tmp = tmp
        self.config = tmp / "proxy.toml"
        self.status_file = tmp / "run" / "proxy.json"
        self.log = tmp / f"proxy-{time.monotonic_ns()}.log"
        registry.place(self.log)
        registry.place(self.status_file.parent)
        self.head = head
        self.write_config(exports)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [KEYSTEWARD, "proxy", "serve", "--config", str(self.config), "--log-level", "debug"],
                stdout=log, stderr=log,
            )  # fmt: skip

    def write_config(self, exports: list[str]) -> None:
        text = f'status_file = "{self.status_file}"\n[metrics]\naddress = "127.0.0.1"\nport = 0\n'
        self.config.write_text(text + self.head + "".join(exports))

    def ready(self, status: dict[str, Any]) -> bool:
        return bool(status.get("proxy", {}).get("port"))

    def states(self) -> dict[str, str]:
        return {name: e["state"] for name, e in self.status().get("exports", {}).items()}

    @property
    def port(self) -> int:
        return int(self.status()["proxy"]["port"])

    def metrics(self) -> str:
        port = self.status()["proxy"]["metrics_port"]
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    yield from reaped([])


# -- real clients -------------------------------------------------------------------------------------------


def qemu_target(port: int, export: str, tls_dir: str | None) -> list[str]:
    """qemu-io's arguments for ``export`` (TLS with a client certificate when ``tls_dir`` is given)."""
    if tls_dir is None:
        return ["-f", "raw", f"nbd://127.0.0.1:{port}/{export}"]
    return [
        "--object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=client",
        "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0",
    ]  # fmt: skip


def qemu_io(port: int, export: str, *commands: str, tls_dir: str | None = None) -> str:
    argv = [tool("qemu-io", "qemu-utils"), *qemu_target(port, export, tls_dir)]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not QEMU_FAILED.search(done.stdout + done.stderr), done.stdout + done.stderr
    return done.stdout


class QemuIoSession:
    """One qemu-io process holding one NBD connection open; commands go to its standard input."""

    def __init__(self, port: int, export: str, tls_dir: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [tool("qemu-io", "qemu-utils"), *qemu_target(port, export, tls_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def run(self, command: str, timeout: float = 20) -> str:
        """Send ``command``; its first result line (a success, a failure, or the process's end)."""
        assert self.proc.stdin is not None
        start = len(self.lines)
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return "process ended"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if QEMU_OK.search(line) or QEMU_FAILED.search(line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                return "process ended: " + "".join(self.lines[start:])
            time.sleep(0.02)
        raise AssertionError(f"qemu-io did not answer {command!r}: {''.join(self.lines)}")

    def ok(self, command: str) -> None:
        line = self.run(command)
        assert QEMU_OK.search(line) and not QEMU_FAILED.search(line), "".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def sessions() -> Iterator[list[QemuIoSession]]:
    opened: list[QemuIoSession] = []
    yield opened
    for session in opened:
        session.close()


def nbd_list(port: int, tls_dir: str | None = None) -> set[str]:
    """The export names ``nbdinfo --list`` sees (over TLS with a client certificate when ``tls_dir`` is given)."""
    uri = f"nbds://127.0.0.1:{port}/?tls-certificates={tls_dir}" if tls_dir else f"nbd://127.0.0.1:{port}"
    done = subprocess.run([tool("nbdinfo", "libnbd-bin"), "--list", "--json", uri],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {e["export-name"] for e in json.loads(done.stdout)["exports"]}


def volume_read(path: Path, pass_file: Path, offset: int, length: int) -> bytes:
    done = subprocess.run(
        [KEYSTEWARD, "volume", "read", str(path), "--passphrase-file", str(pass_file), "--offset", str(offset),
         "--length", str(length)],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{wanted}}} in the metrics")


# -- tests --------------------------------------------------------------------------------------------------


def test_host_release_serves_and_revocation_drops_the_export(
    site: Site, proxies: list[ProxyProcess], sessions: list[QemuIoSession]
) -> None:
    data, volume_id = site.kms_volume("data1")
    plain, plain_pass = passphrase_volume(site.tmp, "plain")
    proxy = ProxyProcess(site.tmp, tls_toml(site), [export_toml("data1", data, clients=(VM1,)),
                         export_toml("plain", plain, pass_file=plain_pass, clients=(VM1,))], site.registry)  # fmt: skip
    proxies.append(proxy)
    proxy.wait(lambda s: proxy.states() == {"data1": "open", "plain": "open"})
    lease = site.admin_call("GET", f"/leases?volume={volume_id}")
    assert [(x["state"], x["holder"]) for x in lease] == [("active", f"host:{HOST}")]

    # written through NBD over TLS, read back from the volume file by keysteward volume read
    qemu_io(proxy.port, "data1", "write -P 0x5a 1M 64k", "flush", tls_dir=site.client_dir)
    break_glass = Path(_write(site.tmp / "break-glass.pass", BREAK_GLASS))
    assert volume_read(data, break_glass, MIB, 65536) == b"\x5a" * 65536
    out = qemu_io(proxy.port, "data1", "read -P 0x5a 1M 64k", "read 0 64k", tls_dir=site.client_dir)
    assert out.count("read 65536/65536") == 2
    # without a client certificate the TLS handshake fails; plaintext is refused
    no_cert = site.tmp / "no-cert"
    no_cert.mkdir()
    _write(no_cert / "ca-cert.pem", Path(site.client_dir, "ca-cert.pem").read_bytes())
    refused = subprocess.run([tool("qemu-io", "qemu-utils"), *qemu_target(proxy.port, "data1", str(no_cert)),
                              "-c", "read 0 4k"], capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert refused.returncode != 0 or QEMU_FAILED.search(refused.stdout + refused.stderr)
    plaintext = subprocess.run(
        [tool("qemu-io", "qemu-utils"), *qemu_target(proxy.port, "data1", None), "-c", "read 0 4k"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "read 4096/4096" not in plaintext.stdout

    # the metrics endpoint counts what the clients did, per export
    text = proxy.metrics()
    assert metric(text, "keysteward_proxy_written_bytes_total", export="data1") >= 65536
    assert metric(text, "keysteward_proxy_read_bytes_total", export="data1") >= 2 * 65536
    assert metric(text, "keysteward_proxy_requests_total", export="data1", command="write") >= 1
    assert metric(text, "keysteward_proxy_request_seconds_count", export="data1", command="read") >= 2
    assert metric(text, "keysteward_proxy_export_open", export="data1") == 1

    # two clients stay connected; the volume is revoked
    on_data, on_plain = (
        QemuIoSession(proxy.port, "data1", site.client_dir),
        QemuIoSession(proxy.port, "plain", site.client_dir),
    )
    sessions += [on_data, on_plain]
    on_data.ok("read -P 0x5a 1M 4k")
    on_plain.ok("read 0 4k")
    revoked_at = time.monotonic()
    site.server.cli("volume", "revoke", volume_id, "--yes", "--kms", site.url, "--ca-file", site.kms_ca,
                    "--reason", "test", token=site.admin)  # fmt: skip
    status = proxy.wait(lambda s: s["exports"]["data1"].get("reason") == "revoked", timeout=10)
    assert time.monotonic() - revoked_at < 1 + 3  # within a renewal interval (1 s) and a margin for the machine
    assert status["exports"]["data1"]["reason"] == "revoked" and status["exports"]["plain"]["state"] == "open"
    failed = on_data.run("read 1M 4k")
    assert not QEMU_OK.search(failed), "".join(on_data.lines)
    on_plain.ok("read 0 4k")  # the other export and its connection go on
    assert nbd_list(proxy.port, site.client_dir) == {"plain"}
    text = proxy.metrics()
    assert metric(text, "keysteward_proxy_export_open", export="data1") == 0
    assert metric(text, "keysteward_proxy_export_closes_total", export="data1", reason="revoked") == 1
    events = proxy.events()
    assert any(e.get("event") == "export_closed" and e.get("export") == "data1" and e.get("reason") == "revoked"
               for e in events)  # fmt: skip
    assert proxy.stop() == 0
    assert volume_read(data, break_glass, MIB, 4096) == b"\x5a" * 4096


def test_reload_adds_and_removes_exports_and_sigterm_stops_cleanly(
    tmp_path: Path, proxies: list[ProxyProcess], sessions: list[QemuIoSession], secret_registry: SecretRegistry
) -> None:
    vols = {name: passphrase_volume(tmp_path, name) for name in ("a", "b", "c")}

    def exports(*names: str) -> list[str]:
        return [export_toml(n, vols[n][0], pass_file=vols[n][1]) for n in names]

    proxy = ProxyProcess(tmp_path, PLAINTEXT, exports("a", "b"), secret_registry)
    proxies.append(proxy)
    proxy.wait(lambda s: proxy.states() == {"a": "open", "b": "open"})
    assert nbd_list(proxy.port) == {"a", "b"}
    shown = subprocess.run([KEYSTEWARD, "proxy", "status", "--config", str(proxy.config), "--json"],
                           capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
    assert {name: e["state"] for name, e in json.loads(shown)["exports"].items()} == {"a": "open", "b": "open"}
    on_a, on_b = QemuIoSession(proxy.port, "a"), QemuIoSession(proxy.port, "b")
    sessions += [on_a, on_b]
    on_a.ok("write -P 0x11 0 64k")
    on_b.ok("read 0 4k")

    proxy.write_config(exports("a", "c"))
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait(lambda s: proxy.states() == {"a": "open", "c": "open"})
    assert nbd_list(proxy.port) == {"a", "c"}
    on_a.ok("read -P 0x11 0 64k")  # the same connection, never dropped
    on_a.ok("write -P 0x22 64k 64k")
    assert not QEMU_OK.search(on_b.run("read 0 4k"))  # b is gone, and its connection with it
    qemu_io(proxy.port, "c", "write -P 0x33 0 4k")
    assert any(e.get("event") == "reloaded" and e.get("removed") == ["b"] for e in proxy.events())

    # a config that does not load is refused; the running exports stay
    proxy.config.write_text(proxy.config.read_text() + "[listen\n")
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not any(e.get("event") == "reload_failed" for e in proxy.events()):
        assert time.monotonic() < deadline, proxy.log.read_text()[-2000:]
        time.sleep(0.05)
    on_a.ok("read -P 0x22 64k 64k")

    # SIGTERM: the connection's writes are flushed, the export closed, exit 0
    on_a.ok("write -P 0x44 128k 4k")
    assert proxy.stop() == 0
    assert any(e.get("event") == "stopped" for e in proxy.events())
    assert volume_read(vols["a"][0], vols["a"][1], 0, 64 * 1024) == b"\x11" * 65536
    assert volume_read(vols["a"][0], vols["a"][1], 128 * 1024, 4096) == b"\x44" * 4096
    assert volume_read(vols["c"][0], vols["c"][1], 0, 4096) == b"\x33" * 4096
    assert BREAK_GLASS.decode() not in proxy.log.read_text()


def test_check_validates_without_opening(tmp_path: Path) -> None:
    vol, pass_file = tmp_path / "v.img", tmp_path / "v.pass"
    vol.write_bytes(b"not even LUKS" * 100)  # check opens nothing: a volume it cannot open still passes
    pass_file.write_bytes(b"x")
    config = tmp_path / "proxy.toml"
    config.write_text(PLAINTEXT + export_toml("v", vol, pass_file=pass_file))
    done = subprocess.run([KEYSTEWARD, "proxy", "check", "--config", str(config), "--json"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exports"] == [{"name": "v", "path": str(vol), "read_only": False,
                                                   "source": "passphrase_file", "clients": []}]  # fmt: skip
    config.write_text(PLAINTEXT.replace("127.0.0.1", "0.0.0.0") + export_toml("v", vol, pass_file=pass_file))  # noqa: S104
    bad = subprocess.run([KEYSTEWARD, "proxy", "check", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "loopback" in bad.stderr and "(proxy_config)" in bad.stderr
    serve = subprocess.run([KEYSTEWARD, "proxy", "serve", "--config", str(config)],
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert serve.returncode == 1 and "(proxy_config)" in serve.stderr and "Traceback" not in serve.stderr


def nbd_fails(port: int, export: str, tls_dir: str) -> bool:
    """True if neither libnbd (nbdinfo) nor qemu-io can open ``export`` with the certificate in ``tls_dir``."""
    info = subprocess.run([tool("nbdinfo", "libnbd-bin"), f"nbds://127.0.0.1:{port}/{export}?tls-certificates={tls_dir}"],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    qemu = subprocess.run([tool("qemu-io", "qemu-utils"), *qemu_target(port, export, tls_dir), "-c", "read 0 4k"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    qemu_failed = qemu.returncode != 0 or bool(QEMU_FAILED.search(qemu.stdout + qemu.stderr))
    return info.returncode != 0 and "export-size" not in info.stdout and "read 4096" not in qemu.stdout and qemu_failed


def test_a_guest_certificate_lists_and_opens_only_the_exports_that_name_it(
    site: Site, proxies: list[ProxyProcess]
) -> None:
    """Issue 11, item 3: another guest's certificate from the same CA neither sees nor opens an export."""
    one, one_pass = passphrase_volume(site.tmp, "guest1")
    two, two_pass = passphrase_volume(site.tmp, "guest2")
    exports = [export_toml("guest1", one, pass_file=one_pass, clients=(VM1,)),
               export_toml("guest2", two, pass_file=two_pass, clients=(VM2, "vm-9"))]  # fmt: skip
    proxy = ProxyProcess(site.tmp, tls_toml(site), exports, site.registry)
    proxies.append(proxy)
    proxy.wait(lambda s: proxy.states() == {"guest1": "open", "guest2": "open"})

    # each guest lists only its own export, and reads and writes it
    assert nbd_list(proxy.port, site.client_dir) == {"guest1"}
    assert nbd_list(proxy.port, site.other_client_dir) == {"guest2"}
    qemu_io(proxy.port, "guest1", "write -P 0x61 0 4k", "read -P 0x61 0 4k", tls_dir=site.client_dir)
    qemu_io(proxy.port, "guest2", "write -P 0x62 0 4k", "read -P 0x62 0 4k", tls_dir=site.other_client_dir)
    # neither opens the other's, by name or as the default export
    assert nbd_fails(proxy.port, "guest2", site.client_dir)
    assert nbd_fails(proxy.port, "guest1", site.other_client_dir)
    assert nbd_fails(proxy.port, "", site.other_client_dir)
    # what guest1 holds was never read by vm-2: its data is intact and guest2's writes stayed in guest2
    assert volume_read(one, one_pass, 0, 4096) == b"\x61" * 4096
    assert volume_read(two, two_pass, 0, 4096) == b"\x62" * 4096

    # refused opens are counted per export and logged with the client's names, never a secret
    text = proxy.metrics()
    assert metric(text, "keysteward_proxy_refused_opens_total", export="guest2", reason="not_allowed") >= 2
    assert metric(text, "keysteward_proxy_refused_opens_total", export="guest1", reason="not_allowed") >= 2
    refusals = [e.get("msg", "") for e in proxy.events() if "nbd open refused" in e.get("msg", "")]
    assert any(VM2 in m and "'guest1'" in m and "not_allowed" in m for m in refusals), refusals
    assert any(VM1 in m and "'guest2'" in m for m in refusals), refusals
    assert BREAK_GLASS.decode() not in proxy.log.read_text()
    assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("head", "export_clients", "complaint"),
    [
        ('[listen]\naddress = "0.0.0.0"\nallow_plaintext = true\n', False, "loopback"),
        ("TLS_NO_CA", True, "client_ca_file"),
        ("TLS", False, "clients"),
        ("PLAINTEXT", True, "without client certificates"),
    ],
)
def test_config_without_client_identities_does_not_load(
    tmp_path: Path, head: str, export_clients: bool, complaint: str
) -> None:
    vol, pass_file = tmp_path / "v.img", tmp_path / "v.pass"
    vol.write_bytes(b"x" * 4096)
    pass_file.write_bytes(b"x")
    pem = _write(tmp_path / "any.pem", "not read: the config is refused first")
    tls = f'[listen]\naddress = "127.0.0.1"\n[tls]\ncert_file = "{pem}"\nkey_file = "{pem}"\n'
    text = {"TLS_NO_CA": tls, "TLS": tls + f'client_ca_file = "{pem}"\n', "PLAINTEXT": PLAINTEXT}.get(head, head)
    config = tmp_path / "proxy.toml"
    config.write_text(text + export_toml("v", vol, pass_file=pass_file, clients=(VM1,) if export_clients else ()))
    for command in ("check", "serve"):
        done = subprocess.run([KEYSTEWARD, "proxy", command, "--config", str(config)],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 1 and "(proxy_config)" in done.stderr and complaint in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
