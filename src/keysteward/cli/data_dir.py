"""The key manager a server's data directory describes: its URL and CA, for clients on the same machine.

``KEYSTEWARD_DATA_DIR`` (or the global ``--data-dir``) names it; its ``keysteward.toml`` says where the
server listens and which CA signed its certificate. Every group takes them from there when ``--url`` /
``KEYSTEWARD_URL`` or ``--ca-file`` / ``KEYSTEWARD_CA_FILE`` are not given (docs/cli.md). Only the standard
library: the ``volume`` group starts without typer or httpx.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

ENV = "KEYSTEWARD_DATA_DIR"


def server_defaults(data_dir: str | None = None) -> tuple[str | None, str | None]:
    """(URL, CA file) of the server whose data directory is ``data_dir`` (default: ``$KEYSTEWARD_DATA_DIR``);
    (None, None) when there is none, or its config cannot be read."""
    data_dir = data_dir or os.environ.get(ENV) or None
    if not data_dir:
        return None, None
    try:
        server = tomllib.loads((Path(data_dir) / "keysteward.toml").read_text()).get("server", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None, None
    if not isinstance(server, dict):
        return None, None
    scheme = "https" if server.get("tls", True) else "http"
    host = str(server.get("listen_host", "127.0.0.1"))
    host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host  # noqa: S104 - mapping a wildcard to a local address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    ca = server.get("tls_ca")
    return f"{scheme}://{host}:{server.get('listen_port', 8443)}", str(ca) if ca else None
