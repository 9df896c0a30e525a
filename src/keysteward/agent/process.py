"""What a keysteward daemon (the agent, the NBD proxy) does as a process: its log lines, its status file,
systemd's notify socket, and hardening (no core dumps, not ptrace-able)."""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

from keysteward.crypto.secret import disable_core_dumps

log = logging.getLogger("keysteward.agent")


def logline(event: str, **fields: Any) -> str:
    """``event=NAME key=value ...``; values with spaces or quotes are JSON strings."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if not text or any(c in text for c in ' "=\n'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def write_status(path: str, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (a reader sees the old or the new file, whole)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def sd_notify(message: str) -> None:
    """Tell systemd (``Type=notify``) about readiness; nothing without ``$NOTIFY_SOCKET``."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            log.warning(logline("sd_notify_failed"))


def harden_process() -> None:
    """No core dumps, and not ptrace-able or readable through /proc by other processes of this user."""
    disable_core_dumps()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        log.warning(logline("not_hardened", reason="prctl unavailable"))
