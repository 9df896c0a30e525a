"""The proxy's configuration: one TOML file, checked whole before anything is opened.

::

    [listen]
    address = "0.0.0.0"              # where NBD clients connect
    port = 10809
    allow_plaintext = false          # true only on a loopback address (tests, a local client)

    [tls]                            # mandatory unless allow_plaintext
    cert_file = "proxy.pem"          # the proxy's server certificate and key
    key_file = "proxy.key"
    client_ca_file = "tenant-ca.pem" # required: every client presents a certificate this CA issued

    [metrics]                        # optional: Prometheus text on http://ADDRESS:PORT/metrics
    address = "127.0.0.1"
    port = 9810

    [kms]                            # needed by exports with kms = true
    url = "https://kms.internal:8443"   # optional: default the URL in each volume's token; or a list of
                                     # servers, tried in turn: ["https://kms-a:8443", "https://kms-b:8443"]
    ca_file = "kms-ca.pem"           # the CA that signed the key manager
    cert_file = "host.pem"           # the proxy's host certificate (keysteward ca issue --role host)
    key_file = "host.key"
    timeout = 10
    grace_seconds = 30               # optional local cap on the key manager's grace

    [[exports]]
    name = "data1"
    path = "/var/lib/keysteward/data1.img"
    read_only = false
    description = "tenant volume"
    kms = true                       # the key comes by a release as a host (the volume's token says where)
    # passphrase_file = "data1.pass" # or: break-glass passphrase (exactly one of the two)
    clients = ["keysteward:acme/agent/vm-1"]  # with [tls], required: who may list and open it (below)

``clients`` names the client certificates that may see and open the export: an entry matches a certificate
whose subject common name, DNS name or URI (subject alternative names) equals it exactly. The identity URI
``keysteward:<tenant>/<role>/<name>`` of a certificate from ``keysteward ca issue`` pins tenant, role and
name; a bare name matches the common name, which a CA may also give a certificate of another role. Without
[tls] (plaintext, loopback only) there are no client identities, so ``clients`` is refused there.

Relative paths are taken from the config file's directory. Every mistake is one :class:`ProxyConfigError`
(``code = proxy_config``) that names the file and the key: bad TOML, an unknown key, a value of the wrong
type, plaintext on a non-loopback address, TLS without ``client_ca_file``, an export without ``clients``
under TLS (or with them without TLS), a file that is missing or unreadable. Parsing reads the TOML
text only; :func:`check_files` looks at (never opens for writing, never unlocks) the files it names.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keysteward.errors import BadRequest, KeystewardError
from keysteward.kms_failover import MAX_URLS, split_urls
from keysteward.toml_config import ConfigReader

CONFIG_CODE = "proxy_config"
MAX_CONFIG = 1 << 20
MAX_EXPORTS = 256
DEFAULT_PORT = 10809
EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Export names: what ``nbd://host/NAME`` and the metrics labels carry."""

_TOP = frozenset({"listen", "tls", "metrics", "kms", "exports", "log_level", "status_file"})
_LISTEN = frozenset({"address", "port", "allow_plaintext"})
_TLS = frozenset({"cert_file", "key_file", "client_ca_file"})
_METRICS = frozenset({"address", "port"})
_KMS = frozenset({"url", "ca_file", "cert_file", "key_file", "timeout", "grace_seconds"})
_EXPORT = frozenset({"name", "path", "read_only", "description", "kms", "passphrase_file", "clients"})
MAX_CLIENTS = 256
"""Client identities one export may name."""
CLIENT_NAME_MAX = 1024
LOG_LEVELS = ("debug", "info", "warning", "error")


class ProxyConfigError(BadRequest):
    """The proxy's config file is wrong; the message names the file and the key."""

    code = CONFIG_CODE
    title = "Invalid proxy configuration"


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str
    key_file: str
    client_ca_file: str


@dataclass(frozen=True)
class KmsConfig:
    """How the proxy reaches the key manager as a ``host``: its mTLS identity is its evidence."""

    url: str | None
    ca_file: str | None
    cert_file: str
    key_file: str
    timeout: float = 10.0
    grace_seconds: float | None = None


@dataclass(frozen=True)
class ExportConfig:
    """One volume served as one NBD export."""

    name: str
    path: str
    read_only: bool = False
    description: str = ""
    kms: bool = False
    passphrase_file: str | None = None
    clients: tuple[str, ...] = ()
    """Client certificate names (common name, DNS or URI SAN) that may list and open it; TLS only."""


@dataclass(frozen=True)
class ProxyConfig:
    source: str
    listen_address: str
    listen_port: int
    allow_plaintext: bool
    tls: TlsConfig | None
    metrics_address: str | None
    metrics_port: int | None
    kms: KmsConfig | None
    exports: tuple[ExportConfig, ...] = field(default_factory=tuple)
    log_level: str = "info"
    status_file: str | None = None

    def export(self, name: str) -> ExportConfig:
        for entry in self.exports:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def files(self) -> list[tuple[str, str]]:
        """``(what, path)`` of every file the proxy reads, for :func:`check_files` and ``proxy check``."""
        found: list[tuple[str, str]] = []
        if self.tls is not None:
            found += [("tls.cert_file", self.tls.cert_file), ("tls.key_file", self.tls.key_file),
                      ("tls.client_ca_file", self.tls.client_ca_file)]  # fmt: skip
        if self.kms is not None:
            if self.kms.ca_file:
                found.append(("kms.ca_file", self.kms.ca_file))
            found += [("kms.cert_file", self.kms.cert_file), ("kms.key_file", self.kms.key_file)]
        for entry in self.exports:
            found.append((f"exports[{entry.name}].path", entry.path))
            if entry.passphrase_file:
                found.append((f"exports[{entry.name}].passphrase_file", entry.passphrase_file))
        return found


# -- small typed readers ---------------------------------------------------------------------------


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: the only addresses where plaintext NBD is allowed."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# -- parsing ---------------------------------------------------------------------------------------


def _clients(r: ConfigReader, item: Mapping[str, Any], where: str, *, tls: bool) -> tuple[str, ...]:
    raw = item.get("clients")
    if raw is None:
        if tls:
            raise r.error(f"{where}.clients", "is required with [tls]: the client certificate names that may open "
                                              "this export (common name, DNS name or URI)")  # fmt: skip
        return ()
    if not tls:
        raise r.error(f"{where}.clients", "needs [tls]: without client certificates there is no identity to check")
    if not isinstance(raw, list) or not raw:
        raise r.error(f"{where}.clients", "must be a non-empty array of strings")
    if len(raw) > MAX_CLIENTS:
        raise r.error(f"{where}.clients", f"names more than {MAX_CLIENTS} clients")
    names: list[str] = []
    for index, name in enumerate(raw):
        if not isinstance(name, str) or not name or len(name) > CLIENT_NAME_MAX:
            raise r.error(f"{where}.clients[{index}]", f"must be a string of 1-{CLIENT_NAME_MAX} characters")
        if name != name.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise r.error(f"{where}.clients[{index}]", "holds control characters or surrounding spaces")
        if name == "*":
            raise r.error(f"{where}.clients[{index}]", "'*' is not a wildcard: name each client")
        names.append(name)
    return tuple(dict.fromkeys(names))


def _exports(r: ConfigReader, raw: Any, *, tls: bool) -> tuple[ExportConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise r.error("exports", "must be an array of tables ([[exports]])")
    if len(raw) > MAX_EXPORTS:
        raise r.error("exports", f"more than {MAX_EXPORTS} exports")
    exports: list[ExportConfig] = []
    names: set[str] = set()
    for index, item in enumerate(raw):
        where = f"exports[{index}]"
        r.known(item, _EXPORT, where)
        name = r.required(item, "name", where)
        if not EXPORT_NAME.fullmatch(name):
            raise r.error(f"{where}.name", f"{name[:60]!r} must be 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
        if name in names:
            raise r.error(f"{where}.name", f"export {name!r} is configured twice")
        names.add(name)
        where = f"exports[{name}]"
        path = r.path(item, "path", where, required=True)
        kms = r.boolean(item, "kms", where)
        passphrase = r.path(item, "passphrase_file", where)
        if kms == (passphrase is not None):
            raise r.error(where, "needs exactly one key source: kms = true or passphrase_file")
        description = r.string(item, "description", where, default="") or ""
        if len(description) > 1024:
            raise r.error(f"{where}.description", "is longer than 1024 characters")
        assert path is not None
        clients = _clients(r, item, where, tls=tls)
        exports.append(
            ExportConfig(name, path, r.boolean(item, "read_only", where), description, kms, passphrase, clients)
        )
    return tuple(exports)


def _kms_urls(r: ConfigReader, table: Mapping[str, Any]) -> str | None:
    """``url``: one https:// URL, a comma list, or a TOML list of them (several servers, tried in turn);
    kept as one comma list, the form every client of keysteward takes."""
    given = table.get("url")
    if isinstance(given, list):
        if not given or len(given) > MAX_URLS or not all(isinstance(u, str) for u in given):
            raise r.error("kms.url", f"a list must hold 1 to {MAX_URLS} strings")
        given = ",".join(given)
    url = r.string({"url": given}, "url", "kms")
    if url is None:
        return None
    try:
        urls = split_urls(url)
    except KeystewardError as exc:
        raise r.error("kms.url", exc.message) from None
    for one in urls:
        if not re.fullmatch(r"https://\S+", one):
            raise r.error("kms.url", f"{one[:60]!r} is not an https:// URL (a host proves itself by mTLS)")
    return ",".join(urls)


def kms_table(r: ConfigReader, data: Mapping[str, Any], exports: tuple[ExportConfig, ...]) -> KmsConfig | None:
    if "kms" not in data:
        if any(e.kms for e in exports):
            raise r.error("kms", "an export has kms = true but there is no [kms] table (the host certificate)")
        return None
    table = r.table(data, "kms", _KMS, "kms")
    url = _kms_urls(r, table)
    cert = r.path(table, "cert_file", "kms", required=True)
    key = r.path(table, "key_file", "kms", required=True)
    assert cert is not None and key is not None
    timeout = r.number(table, "timeout", "kms", low=0.5, high=300) or 10.0
    grace = r.number(table, "grace_seconds", "kms", low=0, high=86400 * 365)
    return KmsConfig(url, r.path(table, "ca_file", "kms"), cert, key, timeout, grace)


def parse_config(text: str, *, source: str = "proxy.toml", base_dir: str = ".") -> ProxyConfig:
    """The config in ``text`` (TOML), every value checked; relative paths are taken from ``base_dir``."""
    r = ConfigReader(source, base_dir, ProxyConfigError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProxyConfigError(f"{source}: not valid TOML: {exc}") from None
    r.known(data, _TOP, "top level")
    listen = r.table(data, "listen", _LISTEN, "listen")
    address = r.address(listen, "address", "listen", default="127.0.0.1")
    port = r.port(listen, "port", "listen", default=DEFAULT_PORT)
    assert port is not None
    plaintext = r.boolean(listen, "allow_plaintext", "listen")
    if plaintext and not is_loopback(address):
        raise r.error(
            "listen.allow_plaintext",
            f"plaintext NBD is allowed only on a loopback address, not {address!r}: configure [tls] instead",
        )
    tls: TlsConfig | None = None
    if "tls" in data:
        table = r.table(data, "tls", _TLS, "tls")
        cert = r.path(table, "cert_file", "tls", required=True)
        key = r.path(table, "key_file", "tls", required=True)
        ca = r.path(table, "client_ca_file", "tls")
        if ca is None:
            why = "every client proves who it is, and each export names who may open it"
            raise r.error("tls.client_ca_file", f"is required: the CA of the clients' certificates ({why})")
        assert cert is not None and key is not None
        tls = TlsConfig(cert, key, ca)
    elif not plaintext:
        raise r.error("tls", "TLS is mandatory: give [tls] cert_file and key_file (or, on loopback only, "
                             "listen.allow_plaintext = true)")  # fmt: skip
    metrics_address: str | None = None
    metrics_port: int | None = None
    if "metrics" in data:
        table = r.table(data, "metrics", _METRICS, "metrics")
        metrics_address = r.address(table, "address", "metrics", default="127.0.0.1")
        metrics_port = r.port(table, "port", "metrics", default=None)
        if metrics_port is None:
            raise r.error("metrics.port", "is required")
    exports = _exports(r, data.get("exports"), tls=tls is not None)
    level = r.string(data, "log_level", "top level", default="info") or "info"
    if level not in LOG_LEVELS:
        raise r.error("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    return ProxyConfig(
        source=source, listen_address=address, listen_port=port, allow_plaintext=plaintext, tls=tls,
        metrics_address=metrics_address, metrics_port=metrics_port, kms=kms_table(r, data, exports), exports=exports,
        log_level=level, status_file=r.path(data, "status_file", "top level"),
    )  # fmt: skip


def check_files(config: ProxyConfig) -> None:
    """Every file the config names exists and is readable (volumes: a file or a block device).

    Looks only (``os.stat``/``os.access``): nothing is opened, nothing unlocked.
    """
    for what, path in config.files():
        try:
            info = os.stat(path)
        except OSError as exc:
            raise ProxyConfigError(f"{config.source}: {what}: cannot use {path}: {exc.strerror}") from None
        if os.path.isdir(path):
            raise ProxyConfigError(f"{config.source}: {what}: {path} is a directory")
        if not os.access(path, os.R_OK):
            raise ProxyConfigError(f"{config.source}: {what}: {path} is not readable")
        if what.endswith(".path"):
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
                raise ProxyConfigError(f"{config.source}: {what}: {path} is not a file or a block device")
            if stat.S_ISREG(info.st_mode) and info.st_size == 0:
                raise ProxyConfigError(f"{config.source}: {what}: {path} is empty")


def load_config(path: str, *, check: bool = True) -> ProxyConfig:
    """Read and parse ``path``; with ``check`` (the default) also :func:`check_files`."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG + 1)
    except OSError as exc:
        raise ProxyConfigError(f"cannot read the proxy config {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise ProxyConfigError(f"the proxy config {path} is larger than {MAX_CONFIG} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyConfigError(f"the proxy config {path} is not UTF-8") from None
    config = parse_config(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)))
    if check:
        check_files(config)
    return config
