"""Issue 11, item 1, at the NBD proxy: a guest certificate revoked (or its CA retired) at the key manager loses
its open NBD connection and cannot open a new one, within the proxy's one-second revocation fetch.

Real processes: the key manager, ``keysteward proxy serve`` (its ``client_ca_file`` is the tenant CA, the
guests' certificates come from ``keysteward ca issue``), qemu-io and nbdinfo as guests over TLS.

- ``ca revoke agent:vm-1``: vm-1's connected qemu-io gets I/O errors, a new open is refused and counted
  (``reason="revoked"``); vm-2 goes on on its own connection;
- ``ca rotate``: the new CA added to ``client_ca_file`` and a SIGHUP let a new-CA guest in while the old-CA
  guest stays connected; ``ca rotate --retire`` then drops the old-CA guest, and the new-CA guest goes on.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keysteward.crypto import x509csr
from tests.e2e.test_proxy import (
    QEMU_OK,
    ProxyProcess,
    QemuIoSession,
    Site,
    _write,
    export_toml,
    make_site,
    metric,
    nbd_fails,
    passphrase_volume,
    qemu_io,
    tls_toml,
)
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.daemons import reaped

pytestmark = pytest.mark.e2e
FETCH = 1.0 + 2.0
"""The proxy's fetch interval, and a margin for a loaded machine."""


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> Site:
    return make_site(tmp_path, server_factory, secret_registry)


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    yield from reaped([])


@pytest.fixture
def sessions() -> Iterator[list[QemuIoSession]]:
    opened: list[QemuIoSession] = []
    yield opened
    for session in opened:
        session.close()


def tenant_guest(site: Site, name: str) -> tuple[str, str]:
    """A guest certificate from the tenant CA (``ca issue``) in qemu's layout; ``(directory, serial)``."""
    key_pem, csr = x509csr.make_csr("acme", "agent", name)
    with site.server.http(site.admin) as c:
        r = c.post("/ca/issue", json={"name": name, "role": "agent", "csr_pem": csr.decode()})
    assert r.status_code == 201, r.text
    folder = site.tmp / f"guest-{name}"
    folder.mkdir()
    # qemu checks the proxy's certificate and its own against this file: the proxy's CA and the tenant CA
    _write(folder / "ca-cert.pem", Path(site.client_dir, "ca-cert.pem").read_text() + r.json()["ca_pem"])
    _write(folder / "client-cert.pem", r.json()["cert_pem"])
    _write(folder / "client-key.pem", key_pem)
    key_pem[:] = bytes(len(key_pem))
    return str(folder), str(r.json()["serial"])


def tenant_ca(site: Site) -> str:
    with site.server.http(site.admin) as c:
        return str(c.get("/ca").json()["cert_pem"])


def wait_failed(session: QemuIoSession, timeout: float) -> float:
    """Seconds until ``session``'s reads fail (its connection dropped); fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not QEMU_OK.search(session.run("read 0 4k")):
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"still served {timeout} s later: {''.join(session.lines)}")


def test_revoked_guest_certificate_loses_its_nbd_connection(
    site: Site, proxies: list[ProxyProcess], sessions: list[QemuIoSession]
) -> None:
    vm1, vm1_serial = tenant_guest(site, "vm-1")
    vm2, _ = tenant_guest(site, "vm-2")
    ca_file = Path(_write(site.tmp / "tenant-ca.pem", tenant_ca(site)))
    disk, disk_pass = passphrase_volume(site.tmp, "shared")
    head = tls_toml(site).replace(f'client_ca_file = "{site.client_ca}"', f'client_ca_file = "{ca_file}"')
    head = head.replace("[kms]\n", f'[kms]\nurl = "{site.url}"\n')
    clients = ("keysteward:acme/agent/vm-1", "keysteward:acme/agent/vm-2", "keysteward:acme/agent/vm-3")
    proxy = ProxyProcess(site.tmp, head, [export_toml("shared", disk, pass_file=disk_pass, clients=clients)],
                         site.registry)  # fmt: skip
    proxies.append(proxy)
    proxy.wait(lambda s: proxy.states() == {"shared": "open"})

    one, two = QemuIoSession(proxy.port, "shared", vm1), QemuIoSession(proxy.port, "shared", vm2)
    sessions += [one, two]
    one.ok("write -P 0x31 0 4k")
    two.ok("read 0 4k")

    revoked = site.server.cli_json(
        "ca", "revoke", "agent:vm-1", "--yes", "--reason", "guest compromised", token=site.admin
    )
    assert revoked["revoked"] == [vm1_serial]
    assert wait_failed(one, FETCH) < FETCH
    assert nbd_fails(proxy.port, "shared", vm1)  # no new connection either
    two.ok("read -P 0x31 0 4k")  # the other guest goes on, on its own connection
    text = proxy.metrics()
    assert metric(text, "keysteward_proxy_refused_opens_total", export="", reason="revoked") >= 1
    assert metric(text, "keysteward_proxy_refused_opens_total", export="shared", reason="revoked") >= 1

    # rotation: the new CA beside the old (client_ca_file + SIGHUP), then the old one retired
    rotated = site.server.cli_json("ca", "rotate", token=site.admin)
    ca_file.write_text(rotated["previous_pem"] + rotated["cert_pem"])
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait(lambda s: any(e.get("event") == "reloaded" for e in proxy.events()))
    vm3, _ = tenant_guest(site, "vm-3")
    three = QemuIoSession(proxy.port, "shared", vm3)
    sessions.append(three)
    three.ok("read -P 0x31 0 4k")  # a new-CA guest right after the rotation
    two.ok("read 0 4k")  # the old-CA guest is still served
    # the proxy's own host certificate moves to the new CA before the old one is retired (else its fetch fails)
    site.server.cli("--cert", site.host_cert, "--key", site.host_key, "ca", "renew")
    site.server.cli("ca", "rotate", "--retire", "--yes", token=site.admin)
    assert wait_failed(two, FETCH) < FETCH
    assert nbd_fails(proxy.port, "shared", vm2)
    three.ok("read 0 4k")
    qemu_io(proxy.port, "shared", "read -P 0x31 0 4k", tls_dir=vm3)
    log = proxy.log.read_text()
    assert "reason=revoked" in log
    assert proxy.stop() == 0


def test_a_proxy_without_kms_says_it_cannot_learn_revocations(site: Site, proxies: list[ProxyProcess]) -> None:
    disk, disk_pass = passphrase_volume(site.tmp, "solo")
    head = tls_toml(site).split("[kms]")[0]
    proxy = ProxyProcess(site.tmp, head, [export_toml("solo", disk, pass_file=disk_pass, clients=("x",))],
                         site.registry)  # fmt: skip
    proxies.append(proxy)
    proxy.wait(lambda s: proxy.states() == {"solo": "open"})
    assert any(e.get("event") == "revocations_unchecked" for e in proxy.events())
    assert proxy.stop() == 0
