"""A key manager process with its KMIP listener on, a tenant with a CA, and hypervisor certificates."""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fixtures.keysteward import SecretRegistry, ServerProcess, free_port, init_manager


@dataclass
class KmipSite:
    server: ServerProcess
    admin: str
    tmp: Path
    port: int
    root_token: str

    def server_root_token(self) -> str:
        return self.root_token

    @property
    def server_ca(self) -> str:
        return self.server.settings.server.tls_ca

    def issue(self, name: str, role: str = "hypervisor") -> tuple[Path, Path, str]:
        """``keysteward ca issue NAME --role ROLE --out-dir D``: D/NAME.pem, D/NAME.key and D/ca.pem."""
        out = self.tmp / f"certs-{name}"
        made = self.server.cli_json("ca", "issue", name, "--role", role, "--out-dir", str(out), token=self.admin)
        assert Path(out / f"{name}.pem").exists() and Path(out / "ca.pem").exists()
        return Path(made["cert"]), Path(made["key"]), str(made["serial"])

    def issue_once(self, name: str) -> tuple[Path, Path]:
        """A hypervisor certificate issued at the first call and reused afterwards."""
        folder = self.tmp / f"certs-{name}"
        if not (folder / f"{name}.pem").exists():
            self.issue(name)
        return folder / f"{name}.pem", folder / f"{name}.key"

    def tls(self, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.server_ca)
        ctx.check_hostname = False
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx

    def wait_served(self, ctx: ssl.SSLContext) -> None:
        """Until every worker serves ``ctx``'s client (a new tenant CA reaches each within about a second)."""
        from tests.support.kmip_client import wait_served

        assert wait_served(self.port, ctx, 15), "the workers never began serving the tenant's hypervisors"

    def pykmip(self, cert: tuple[Path, Path]) -> Any:
        """PyKMIP 0.11's ProxyKmipClient on this listener (TLS 1.2, as its docs configure it)."""
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from kmip.pie.client import ProxyKmipClient

        return ProxyKmipClient(
            hostname="127.0.0.1", port=self.port, cert=str(cert[0]), key=str(cert[1]), ca=self.server_ca,
            ssl_version="PROTOCOL_TLSv1_2", config_file="/dev/null",
        )  # fmt: skip


def make_kmip_site(
    tmp: Path, server_factory: Callable[..., ServerProcess], registry: SecretRegistry, tenant: str = "acme",
    env: dict[str, str] | None = None,
) -> KmipSite:  # fmt: skip
    out = init_manager(tmp / "ks", registry)
    port = free_port()
    server = server_factory(tmp / "ks", env={"KEYSTEWARD_KMIP_LISTEN": f"127.0.0.1:{port}", **(env or {})})
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": tenant}).json()["admin_token"]["token"])
    with server.http(admin) as c:
        assert c.post("/ca/init").status_code == 201
    return KmipSite(server, admin, tmp, port, out.root_token.secret)
