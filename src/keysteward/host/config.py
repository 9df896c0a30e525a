"""The host agent's config file (``keysteward host run --config FILE``, docs/hosts.md).

One TOML file, read strictly (unknown keys, wrong types and missing files are one error naming the key,
``host_config``) with the proxy's reader. Relative paths are taken from the file's directory.

    state_dir = "/var/lib/keysteward/host"   # run directories of the VMs (sockets, serial logs), 0700
    snapshot_dir = "/srv/vm-state"            # where VM state files go (shared storage for restores elsewhere)
    poll_seconds = 1.0                        # the longest an order fetch waits (a long poll)
    log_level = "info"
    status_file = "/run/keysteward/host.json"
    [kms]                                     # the host certificate: the host's identity
    url = "https://kms.internal:8443"
    ca_file = "ca.pem"; cert_file = "host.pem"; key_file = "host.key"; timeout = 10; grace_seconds = 30
    [tpm]                                     # the TPM whose quotes go with every VM start and restore
    tcti = "device:/dev/tpmrm0"; pcrs = "sha256:0,7"
    [qemu]
    binary = "qemu-system-x86_64"; accel = "auto"   # auto: KVM where a probe boot works, else TCG
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

from keysteward.agent.unlock import parse_pcrs
from keysteward.errors import BadRequest, KeystewardError
from keysteward.proxy.config import LOG_LEVELS, MAX_CONFIG, KmsConfig, kms_table
from keysteward.toml_config import ConfigReader

ACCELS = ("auto", "kvm", "tcg")
_TOP = frozenset({"state_dir", "snapshot_dir", "poll_seconds", "log_level", "status_file", "kms", "tpm", "qemu"})
_TPM = frozenset({"tcti", "pcrs"})
_QEMU = frozenset({"binary", "accel"})


class HostConfigError(BadRequest):
    """The host agent's config file is wrong; the message names the file and the key."""

    code = "host_config"
    title = "Invalid host configuration"


@dataclass(frozen=True)
class HostConfig:
    kms: KmsConfig
    state_dir: str
    snapshot_dir: str
    poll_seconds: float = 1.0
    log_level: str = "info"
    status_file: str | None = None
    tpm: str | None = None
    tpm_pcrs: str = "sha256:0,7"
    qemu: str = "qemu-system-x86_64"
    accel: str = "auto"

    @property
    def url(self) -> str:
        assert self.kms.url is not None
        return self.kms.url


def parse_config(text: str, *, source: str = "host.toml", base_dir: str = ".") -> HostConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostConfigError(f"{source}: not TOML: {exc}") from None
    r = ConfigReader(source, base_dir, HostConfigError)
    r.known(data, _TOP, "top level")
    kms = kms_table(r, data, ())
    if kms is None or kms.url is None:
        raise r.error("kms", "a [kms] table with url, cert_file and key_file (the host certificate) is required")
    tpm = r.table(data, "tpm", _TPM, "tpm")
    pcrs = r.string(tpm, "pcrs", "tpm", default="sha256:0,7") or "sha256:0,7"
    try:
        parse_pcrs(pcrs)
    except KeystewardError as exc:
        raise r.error("tpm.pcrs", exc.message) from None
    qemu = r.table(data, "qemu", _QEMU, "qemu")
    accel = r.string(qemu, "accel", "qemu", default="auto") or "auto"
    if accel not in ACCELS:
        raise r.error("qemu.accel", f"must be one of {', '.join(ACCELS)}")
    level = r.string(data, "log_level", "top level", default="info") or "info"
    if level not in LOG_LEVELS:
        raise r.error("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    state_dir = r.path(data, "state_dir", "top level", required=True)
    snapshot_dir = r.path(data, "snapshot_dir", "top level", required=True)
    assert state_dir is not None and snapshot_dir is not None
    return HostConfig(
        kms=kms,
        state_dir=state_dir,
        snapshot_dir=snapshot_dir,
        poll_seconds=r.number(data, "poll_seconds", "top level", low=0.1, high=60) or 1.0,
        log_level=level,
        status_file=r.path(data, "status_file", "top level"),
        tpm=r.string(tpm, "tcti", "tpm"),
        tpm_pcrs=pcrs,
        qemu=r.string(qemu, "binary", "qemu", default="qemu-system-x86_64") or "qemu-system-x86_64",
        accel=accel,
    )


def load_config(path: str) -> HostConfig:
    """Read and check ``path``; the files it names (certificates, CA) must be readable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except OSError as exc:
        raise HostConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise HostConfigError(f"{path}: larger than {MAX_CONFIG} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise HostConfigError(f"{path}: not UTF-8") from None
    config = parse_config(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)))
    for key, name in (("kms.cert_file", config.kms.cert_file), ("kms.key_file", config.kms.key_file),
                      ("kms.ca_file", config.kms.ca_file)):  # fmt: skip
        if name is not None and not os.access(name, os.R_OK):
            raise HostConfigError(f"{path}: {key}: cannot read {name}")
    return config
