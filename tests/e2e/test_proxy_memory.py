"""The attack test of proxy mode: a memory dump of the client (the guest's side) holds no volume key.

A real key manager process releases the volume's key to a real ``keysteward proxy serve`` process (as a
host, by its certificate); a qemu-io process, connected over NBD with TLS, writes and reads the volume
through the proxy and stays connected. Then every readable mapping of each process is searched
(``/proc/PID/mem`` over ``/proc/PID/maps``) for the volume key, which the test learns from the volume's
break-glass keyslot:

- the client: not found, ever (it only ever saw plaintext blocks);
- the proxy while serving: found (it holds the key in its locked buffer; the scan finds what is there);
- the proxy after ``keysteward volume revoke``: not found (the export was dropped and the key wiped), and
  the client still not.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.test_proxy import (
    PLAINTEXT,
    QEMU_OK,
    VM1,
    ProxyProcess,
    QemuIoSession,
    Site,
    export_toml,
    make_site,
    passphrase_volume,
    proxies,  # noqa: F401 - fixture
    sessions,  # noqa: F401 - fixture
    tls_toml,
    volume_key,
)
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.daemons import memory_holds

pytestmark = pytest.mark.e2e


@pytest.fixture
def memory_site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> Site:
    return make_site(tmp_path, server_factory, secret_registry)


def test_the_volume_key_is_in_the_proxy_only_and_gone_after_revocation(
    memory_site: Site,
    proxies: list[ProxyProcess],  # noqa: F811
    sessions: list[QemuIoSession],  # noqa: F811
) -> None:
    site = memory_site
    path, volume_id = site.kms_volume("guest-disk")
    key = volume_key(path)
    needles = {"volume key": key, "volume key (first half)": key[: len(key) // 2]}
    proxy = ProxyProcess(site.tmp, tls_toml(site), [export_toml("guest-disk", path, clients=(VM1,))], site.registry)
    proxies.append(proxy)
    proxy.wait(lambda s: proxy.states() == {"guest-disk": "open"})

    client = QemuIoSession(proxy.port, "guest-disk", site.client_dir)
    sessions.append(client)
    client.ok("write -P 0x6b 0 1M")
    client.ok("read -P 0x6b 0 1M")
    client.ok("read 1M 1M")

    assert memory_holds(client.proc.pid, needles) == set()  # the guest's side never held the key
    assert memory_holds(proxy.proc.pid, needles) == set(needles)  # the proxy does, while it serves

    site.server.cli(
        "volume", "revoke", volume_id, "--yes", "--kms", site.url, "--ca-file", site.kms_ca, token=site.admin
    )
    # the keeper's reason reaches the status file after its step, that is after the key was wiped
    proxy.wait(lambda s: s["exports"]["guest-disk"].get("reason") == "revoked", timeout=10)
    assert memory_holds(proxy.proc.pid, needles) == set()
    assert memory_holds(client.proc.pid, needles) == set()
    text = proxy.log.read_text() + proxy.status_file.read_text()
    assert key.hex() not in text
    assert proxy.stop() == 0


def test_the_native_data_plane_holds_the_key_only_while_its_export_is_served(
    tmp_path: Path,
    secret_registry: SecretRegistry,
    proxies: list[ProxyProcess],  # noqa: F811
    sessions: list[QemuIoSession],  # noqa: F811
) -> None:
    """Plaintext on loopback (how QEMU on the same host connects): the connection runs on the native loop, which
    uses the volume's own cipher context. Removing the export (SIGHUP) while qemu-io stays connected ends the
    loop and wipes the key; the client never held it."""
    path, pass_file = passphrase_volume(tmp_path, "local-disk")
    key = volume_key(path)
    needles = {"volume key": key, "volume key (first half)": key[: len(key) // 2]}
    proxy = ProxyProcess(tmp_path, PLAINTEXT, [export_toml("local-disk", path, pass_file=pass_file)], secret_registry)
    proxies.append(proxy)
    proxy.wait(lambda s: proxy.states() == {"local-disk": "open"})
    client = QemuIoSession(proxy.port, "local-disk")
    sessions.append(client)
    client.ok("write -P 0x5a 0 1M")
    client.ok("read -P 0x5a 0 1M")
    assert "nbd native data plane" in proxy.log.read_text()
    assert memory_holds(client.proc.pid, needles) == set()
    assert memory_holds(proxy.proc.pid, needles) == set(needles)

    proxy.write_config([])
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait(lambda s: proxy.states() == {}, timeout=10)
    assert not QEMU_OK.search(client.run("read 0 4k"))  # its connection went with the export
    assert memory_holds(proxy.proc.pid, needles) == set()
    assert memory_holds(client.proc.pid, needles) == set()
    assert proxy.stop() == 0
