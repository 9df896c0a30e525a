"""The agent's volume list: a crypttab-style file, one volume a line::

    # name   path                      options
    data1    /dev/disk/by-id/nvme-data1  identity=aws-iid,metadata=http://169.254.169.254
    logs     /var/lib/ks/logs.img        url=https://kms.internal:8443,ca=/etc/keysteward/ca.pem,grace=0

Options, comma-separated (``-`` or nothing for none): ``url=URL`` (old spelling ``kms=URL``; default: the
volume token's),
``identity=aws-iid|gcp-jwt``, ``metadata=URL``, ``audience=A``, ``suite=x25519|mlkem768-x25519``,
``ca=FILE``, ``mode=auto|dm|userspace``, ``grace=SECONDS|lease`` (stricter than the key manager's
grace only: the agent uses the smaller of the two), ``timeout=SECONDS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from keysteward.agent.unlock import IDENTITY_KINDS, UnlockOptions, parse_pcrs
from keysteward.crypto.hpke import SUITES
from keysteward.errors import BadRequest, KeystewardError

CONFIG_INVALID = "agent_config"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODES = ("auto", "dm", "userspace")
MAX_LINES = 1024


@dataclass(frozen=True)
class VolumeEntry:
    name: str
    path: str
    options: UnlockOptions
    grace_seconds: float | None = None
    """A local cap on the grace when the key manager is unreachable (None: the key manager's)."""
    line: int = 0


def _error(source: str, line: int, message: str) -> BadRequest:
    return BadRequest(f"{source} line {line}: {message}", code=CONFIG_INVALID)


def _seconds(value: str, source: str, line: int, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _error(source, line, f"{what} {value[:20]!r} is not a number of seconds") from None
    if not 0 <= number <= 86400 * 365:
        raise _error(source, line, f"{what} {value[:20]!r} is out of range")
    return number


def _options(text: str, source: str, line: int) -> tuple[UnlockOptions, float | None]:
    fields: dict[str, Any] = {}
    grace: float | None = None
    if text in ("", "-", "none"):
        return UnlockOptions(), None
    seen: set[str] = set()
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise _error(source, line, f"option {item[:40]!r} is not KEY=VALUE")
        key = "url" if key == "kms" else key  # kms= is the old spelling of url=, as --kms of --url
        if key in seen:
            raise _error(source, line, f"option {key!r} is given twice")
        seen.add(key)
        if key == "url":
            if not re.fullmatch(r"https?://\S+", value):
                raise _error(source, line, f"url={value[:40]!r} is not an http(s) URL")
            fields["kms_url"] = value
        elif key == "identity":
            if value not in IDENTITY_KINDS:
                raise _error(source, line, f"identity must be one of {', '.join(IDENTITY_KINDS)}")
            fields["identity"] = value
        elif key == "metadata":
            if not re.fullmatch(r"https?://\S+", value):
                raise _error(source, line, f"metadata={value[:40]!r} is not an http(s) URL")
            fields["metadata_url"] = value
        elif key == "audience":
            fields["audience"] = value
        elif key == "suite":
            if value not in SUITES:
                raise _error(source, line, f"suite must be one of {', '.join(SUITES)}")
            fields["suite"] = value
        elif key == "ca":
            fields["ca_file"] = value
        elif key == "mode":
            if value not in MODES:
                raise _error(source, line, f"mode must be one of {', '.join(MODES)}")
            fields["mode"] = value
        elif key == "timeout":
            fields["timeout"] = max(0.5, _seconds(value, source, line, "timeout"))
        elif key == "tpm":
            fields["tpm"] = value
        elif key == "tpm-pcrs":
            try:
                parse_pcrs(value)
            except KeystewardError as exc:
                raise _error(source, line, exc.message) from None
            fields["tpm_pcrs"] = value
        elif key == "snp":
            fields["snp"] = value
        elif key == "wait-approval":
            fields["wait_approval"] = _seconds(value, source, line, "wait-approval")
        elif key == "grace":
            grace = None if value == "lease" else _seconds(value, source, line, "grace")
        else:
            raise _error(source, line, f"unknown option {key[:40]!r}")
    return UnlockOptions(**fields), grace


def parse_config(text: str, *, source: str = "config") -> list[VolumeEntry]:
    """The volumes of a config file's text; any error names its line, and nothing is half-read."""
    entries: list[VolumeEntry] = []
    names: set[str] = set()
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise BadRequest(f"{source} has more than {MAX_LINES} lines", code=CONFIG_INVALID)
    for number, raw in enumerate(lines, start=1):
        content = raw.split("#", 1)[0].strip()
        if not content:
            continue
        parts = content.split()
        if len(parts) not in (2, 3):
            raise _error(source, number, "expected NAME PATH [OPTIONS]")
        name, path = parts[0], parts[1]
        if not NAME.fullmatch(name):
            raise _error(source, number, f"name {name[:40]!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        if name in names:
            raise _error(source, number, f"name {name!r} is used twice")
        if not path.startswith("/"):
            raise _error(source, number, f"path {path[:60]!r} is not absolute")
        options, grace = _options(parts[2] if len(parts) == 3 else "", source, number)
        names.add(name)
        entries.append(VolumeEntry(name, path, replace(options, name=name), grace, number))
    return entries


def read_config(path: str) -> list[VolumeEntry]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(1 << 20)
    except OSError as exc:
        raise BadRequest(f"cannot read the agent config {path}: {exc.strerror}", code=CONFIG_INVALID) from exc
    except UnicodeDecodeError:
        raise BadRequest(f"the agent config {path} is not UTF-8", code=CONFIG_INVALID) from None
    return parse_config(text, source=path)
