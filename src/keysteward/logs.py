"""Logs as JSON lines, one object a line, for every long-running process (server, proxy, agents).

``time``, ``level``, ``logger`` and the record's fields: a message in the ``event=NAME key=value`` form
(:func:`keysteward.agent.process.logline`) is split into fields, any other message is ``msg``; exceptions
are reduced to their type and message (a traceback could carry locals' reprs). HTTP client libraries are
kept to warnings: their INFO lines carry request URLs (nonces in query strings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``event`` and the record's fields.

    Messages in the agent's ``event=NAME key=value`` form are split into fields; any other message is
    ``msg``. Exceptions are reduced to their type and message (a traceback could carry locals' reprs).
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        elif message.startswith("event="):
            for key, raw in _FIELD.findall(message):
                value: Any = raw
                if raw.startswith('"'):
                    with contextlib.suppress(ValueError):
                        value = json.loads(raw)
                out[key] = value
        else:
            out["msg"] = message
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return json.dumps(out, default=str)


def quiet_http_clients() -> None:
    """httpx and httpcore log every request at INFO/DEBUG with its URL: keep them to warnings and errors."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def json_logging(level: str) -> None:
    """JSON lines on standard error at ``level`` (debug, info, warning, error) for the whole process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    quiet_http_clients()
