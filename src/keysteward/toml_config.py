"""Reading a daemon's TOML config file strictly: typed values, paths from the file's directory, and one
error naming the file and the key for every mistake. The NBD proxy's and the host agent's files use it."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Any

from keysteward.errors import BadRequest

HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


class ConfigReader:
    """Typed access to one TOML table; every complaint names the source file and the key path, raised as
    ``error_type`` (the daemon's own config error: ``proxy_config``, ``host_config``)."""

    def __init__(self, source: str, base: str, error_type: type[BadRequest]) -> None:
        self.source = source
        self.base = base
        self.error_type = error_type

    def error(self, where: str, message: str) -> BadRequest:
        return self.error_type(f"{self.source}: {where}: {message}")

    def table(self, data: Mapping[str, Any], key: str, allowed: frozenset[str], where: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(where, "must be a table")
        self.known(value, allowed, where)
        return value

    def known(self, table: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            listed = ", ".join(repr(k[:40]) for k in unknown[:5])
            raise self.error(where, f"unknown key {listed} (known: {', '.join(sorted(allowed))})")

    def string(self, table: Mapping[str, Any], key: str, where: str, *, default: str | None = None) -> str | None:
        value = table.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(f"{where}.{key}", "must be a string")
        if len(value) > 4096 or "\x00" in value:
            raise self.error(f"{where}.{key}", "is too long or holds a NUL byte")
        return value

    def required(self, table: Mapping[str, Any], key: str, where: str) -> str:
        value = self.string(table, key, where)
        if not value:
            raise self.error(f"{where}.{key}", "is required")
        return value

    def path(self, table: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
        value = self.required(table, key, where) if required else self.string(table, key, where)
        if not value:
            return None
        return os.path.normpath(os.path.join(self.base, value))

    def boolean(self, table: Mapping[str, Any], key: str, where: str, *, default: bool = False) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(f"{where}.{key}", "must be true or false")
        return value

    def number(self, table: Mapping[str, Any], key: str, where: str, *, low: float, high: float) -> float | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
            raise self.error(f"{where}.{key}", f"must be a number from {low:g} to {high:g}")
        return float(value)

    def port(self, table: Mapping[str, Any], key: str, where: str, *, default: int | None) -> int | None:
        value = table.get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise self.error(f"{where}.{key}", "must be a port number from 0 to 65535 (0: any free port)")
        return value

    def address(self, table: Mapping[str, Any], key: str, where: str, *, default: str) -> str:
        value = self.string(table, key, where, default=default) or ""
        if not value:
            raise self.error(f"{where}.{key}", "is empty")
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not HOSTNAME.fullmatch(value):
                raise self.error(f"{where}.{key}", f"{value[:60]!r} is not an IP address or host name") from None
        return value
