"""Configuration: one TOML file plus ``KEYSTEWARD_<SECTION>_<NAME>`` environment overrides.

Settings are built once in ``main()`` (CLI) and passed down; nothing reads them at import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keysteward.errors import BadRequest

CONFIG_NAME = "keysteward.toml"


@dataclass(frozen=True)
class ServerSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8443
    metrics_access: str = "loopback"  # "loopback": /metrics for loopback peers and system tokens; "token": tokens only
    database_url: str = ""
    tls: bool = True
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    max_body_bytes: int = 65536
    max_header_bytes: int = 16384  # request line and headers together; more: 431
    max_headers: int = 100  # header fields in one request; more: 431
    header_timeout: float = 10.0  # seconds for the TLS handshake, then for each request head
    body_timeout: float = 30.0  # seconds for a request body once its head is in
    max_connections: int = 1024  # open connections per listener (per worker process)
    max_connections_per_source: int = 128  # of those, from one IPv4 address or IPv6 /64
    workers: int = 1
    log_level: str = "info"


@dataclass(frozen=True)
class SealSettings:
    dev_key_file: str = ""
    pkcs11_module: str = "/usr/lib/softhsm/libsofthsm2.so"
    pkcs11_token_label: str = "keysteward"  # noqa: S105 - a label
    pkcs11_key_label: str = "keysteward-root-seal"
    pkcs11_pin_file: str = ""
    # bad unseal shares (and refused resets) one source, and all sources together, may send per window
    unseal_failures_per_source: int = 10
    unseal_failures_overall: int = 100
    unseal_failure_window_seconds: float = 60.0


@dataclass(frozen=True)
class StorageSettings:
    sqlite_synchronous: str = "FULL"
    pool_size: int = 20
    # PostgreSQL: a statement (a commit waiting for the synchronous standby included) is cancelled after this
    # many seconds and the request answers 503 database_unavailable; a hung primary's connections are cut
    database_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class RewrapSettings:
    batch_size: int = 200
    interval: float = 0.0
    lease_seconds: float = 30.0
    poll_seconds: float = 1.0


@dataclass(frozen=True)
class ReleaseSettings:
    nonce_ttl_seconds: float = 60.0
    audience: str = "keysteward"  # the audience identity tokens (gcp-jwt) must name
    alert_webhook_url: str = ""  # suspected clones and other alerts are POSTed here as JSON
    alert_webhook_timeout: float = 5.0
    default_lease_seconds: int = 30
    default_renew_seconds: int = 10
    approval_ttl_seconds: float = 900.0  # a release waiting for approval expires after this
    approval_poll_seconds: float = 5.0  # what a pending answer tells the agent to wait before asking again
    # a person votes on releases only this long after gaining the approving role, and for this long after an
    # admin mints them a token, a vote with it does not count where that admin is a party (requester, voter)
    approver_cooling_off_seconds: float = 86400.0
    tpm_ek_roots: str = ""  # PEM file: TPM manufacturer roots an EK certificate must chain to for enrollment
    snp_roots: str = ""  # PEM file: ARKs trusted besides AMD's built-in ones (test chains, never by default)
    snp_cert_cache: str = ""  # directory of VCEK/ASK certificates put there by the operator (nothing is fetched)
    # refused releases one source may cause, before its evidence proved anyone, per window; then 429
    refusals_per_source: int = 60
    refusal_window_seconds: float = 60.0

    def __post_init__(self) -> None:
        cooling = self.approver_cooling_off_seconds
        if not math.isfinite(cooling) or cooling < 0:  # nan or a negative period would switch the rules off
            raise BadRequest(
                "setting release.approver_cooling_off_seconds must be a number of seconds, 0 or more",
                code="bad_setting",
            )


@dataclass(frozen=True)
class AuditSettings:
    # where signed checkpoints of every chain head go (see keysteward.audit.sinks): "file:PATH", "syslog",
    # "syslog:/socket/path", "syslog://HOST:PORT", "https://..."; the environment override is a
    # comma-separated list or a JSON array
    checkpoint_sinks: tuple[str, ...] = ()
    checkpoint_interval: float = 60.0  # seconds between rounds; destroys and unseals publish at once
    checkpoint_webhook_timeout: float = 5.0
    # refusals of unproven callers are counted, one record per interval per tenant, action and reason
    refusal_interval: float = 60.0


@dataclass(frozen=True)
class XksSettings:
    # the AWS KMS external key store listener (docs/xks.md): HOST:PORT, off when empty; it uses the
    # [server] TLS certificate and connection limits unless tls_cert/tls_key are set here
    listen: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    mtls_ca: str = ""  # PEM file: require client certificates chained to it (AWS KMS presents one)
    mtls_subject: str = ""  # with mtls_ca: the client certificate's CN must be this (cks.kms.REGION.amazonaws.com)
    quota_tps: float = 1800.0  # requests per second per store prefix; more answer 429 ThrottlingException
    max_skew_seconds: float = 300.0  # how far x-amz-date may be from this server's clock
    max_body_bytes: int = 65536
    health_cache_seconds: float = 30.0  # a deep health check's result is reused this long (at most 60)
    slow_database_ms: float = 100.0  # a health probe slower than this reports DEGRADED


@dataclass(frozen=True)
class KmipSettings:
    # the KMIP listener (docs/kmip.md): TTLV over mutual TLS, on when listen is "HOST:PORT" (e.g. "0.0.0.0:5696")
    listen: str = ""
    kek: str = "kmip"  # the tenant key whose primary version wraps KMIP objects (created at the first Create)
    tls_ciphers: str = ""  # TLS 1.2 suites (OpenSSL syntax) for old clients; "" keeps the forward-secret AEAD ones
    max_message_bytes: int = 262144  # a request over this is refused from its header, before its body is read
    idle_timeout: float = 60.0  # seconds a connection may wait between requests
    read_timeout: float = 10.0  # seconds for the TLS handshake, and for a whole request once its first byte is in
    max_connections: int = 1024
    max_connections_per_source: int = 128
    max_locate_items: int = 1000  # the most identifiers one Locate answers, whatever Maximum Items asks
    platform_max_age: float = 86400.0  # seconds a hypervisor's latest verified TPM quote is its context.platform


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    server: ServerSettings = field(default_factory=ServerSettings)
    seal: SealSettings = field(default_factory=SealSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    rewrap: RewrapSettings = field(default_factory=RewrapSettings)
    release: ReleaseSettings = field(default_factory=ReleaseSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    xks: XksSettings = field(default_factory=XksSettings)
    kmip: KmipSettings = field(default_factory=KmipSettings)

    @property
    def database_url(self) -> str:
        return self.server.database_url or f"sqlite:///{self.data_dir / 'keysteward.db'}"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    def path(self, value: str, default: str) -> Path:
        return Path(value) if value else self.data_dir / default


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "seal": SealSettings,
    "storage": StorageSettings,
    "rewrap": RewrapSettings,
    "release": ReleaseSettings,
    "audit": AuditSettings,
    "xks": XksSettings,
    "kmip": KmipSettings,
}
_STRINGS = (tuple[str, ...], "tuple[str, ...]")
MAX_LIST = 64


def _string_list(value: Any) -> tuple[str, ...]:
    """A TOML array of strings, or (from the environment) a JSON array or a comma-separated list."""
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [v for v in (p.strip() for p in text.split(",")) if v]
    if not isinstance(value, list | tuple) or len(value) > MAX_LIST or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of strings")
    return tuple(value)


def _coerce(section: str, name: str, kind: Any, value: Any) -> Any:
    try:
        if kind in _STRINGS:
            return _string_list(value)
        if kind in (bool, "bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"1", "true", "yes", "on"}:
                return True
            if str(value).lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if kind in (int, "int"):
            if isinstance(value, bool | float):
                raise ValueError(value)
            return int(value)
        if kind in (float, "float"):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"setting {section}.{name} has a bad value", code="bad_setting") from exc


def load(data_dir: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``<data_dir>/keysteward.toml`` (if present) and apply environment overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = data_dir / CONFIG_NAME
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"{path} is not valid TOML: {exc}", code="bad_config") from exc
    stray = set(raw) - set(_SECTIONS)
    if stray:
        raise BadRequest(
            f"unknown table(s) or key(s) in {path}: {', '.join(sorted(stray))} (tables: {', '.join(_SECTIONS)})",
            code="bad_config",
        )
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise BadRequest(f"[{section}] in {path} must be a table", code="bad_config")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            env_name = f"KEYSTEWARD_{section.upper()}_{f.name.upper()}"
            if env_name in env:
                values[f.name] = _coerce(section, f.name, f.type, env[env_name])
            elif f.name in given:
                values[f.name] = _coerce(section, f.name, f.type, given[f.name])
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise BadRequest(f"unknown setting(s) in [{section}]: {', '.join(sorted(unknown))}", code="bad_config")
        sections[section] = cls(**values)
    return Settings(data_dir=data_dir, **sections)


def render(settings: Settings) -> str:
    """The TOML text of ``settings`` (for ``server init``)."""
    lines: list[str] = []
    for section in _SECTIONS:
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(settings, section)).items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, list | tuple):
                items = ", ".join(json.dumps(str(v), ensure_ascii=False) for v in value)
                lines.append(f"{key} = [{items}]")
            elif isinstance(value, int | float):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f"{key} = {json.dumps(str(value), ensure_ascii=False)}")  # a valid TOML basic string
        lines.append("")
    return "\n".join(lines)


def listen_address(value: str, setting: str) -> tuple[str, int]:
    """The ``(host, port)`` of a listener's ``HOST:PORT`` setting (``[::1]:5696`` for IPv6); anything else is
    a bad ``setting``."""
    host, sep, port = value.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"setting {setting} must be HOST:PORT", code="bad_setting")
    return host, int(port)
