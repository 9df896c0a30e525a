"""The servers a bench measures: the tests' throw-away PostgreSQL cluster and a real keysteward server process
(``keysteward server init`` + ``server start`` in a data directory of its own, over HTTPS). Every name here is
importable from bench/_common.py too.

Nothing here imports pytest or the test fixtures: the PostgreSQL helper mirrors tests/fixtures/postgres.py
(both start clusters with tests/support/pgcluster.py).

Not a bench itself: the benches that use it (through bench/_common.py) end with their
``{"bench": NAME, "figures": [...]}`` line (:func:`_common.run_bench`).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _cleanup import BenchError, Cleanup, free_port, make_temp_dir, stop_process
from _cpu import children

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench scripts share the tests' PostgreSQL helper

from tests.support import pgcluster  # noqa: E402

# -- PostgreSQL ------------------------------------------------------------------------------


@dataclass
class PgCluster:
    """The tests' throw-away PostgreSQL cluster (tests/support/pgcluster.py), stopped by the bench's cleanup."""

    cluster: pgcluster.PgCluster

    @classmethod
    def start(cls, cleanup: Cleanup) -> PgCluster:
        try:
            cluster = pgcluster.start(prefix="ks-bench-pg-")
        except pgcluster.PgUnavailable as exc:
            raise BenchError(str(exc)) from exc
        cleanup.push("stop PostgreSQL", cluster.stop)
        return cls(cluster)

    @property
    def port(self) -> int:
        return self.cluster.port

    def create_database(self, name: str) -> str:
        return self.cluster.create_database(name)

    def pids(self) -> list[int]:
        """The postmaster and all its children (backends, background workers)."""
        try:
            master = int((self.cluster.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [master, *children(master)]


# -- keysteward server -----------------------------------------------------------------------


def keysteward_cli() -> list[str]:
    for candidate in (Path(sys.executable).with_name("keysteward"), REPO / ".venv" / "bin" / "keysteward"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    found = shutil.which("keysteward")
    if found:
        return [found]
    raise BenchError("no `keysteward` command: run `bash scripts/bootstrap.sh` and use .venv/bin/python")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus any KEYSTEWARD_* the caller had (they would reconfigure our server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTEWARD_")}
    env.update(extra)
    return env


@dataclass
class KeystewardServer:
    """``keysteward server init`` + ``server start`` in a data directory of its own, over HTTPS."""

    data_dir: Path
    port: int
    url: str = ""
    ca_file: str = ""
    root_token: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    _ssl: ssl.SSLContext | None = None

    @classmethod
    def init(cls, cleanup: Cleanup, *, database_url: str = "") -> KeystewardServer:
        data_dir = make_temp_dir(cleanup, "ks-bench-data-")
        server = cls(data_dir=data_dir, port=free_port(), log_path=data_dir.parent / f"{data_dir.name}.log")
        cleanup.push(f"remove {server.log_path}", lambda: server.forget_log(cleanup.failed))
        args = ["server", "init", "--seal", "dev", "--insecure-dev-seal", "--listen-port", str(server.port), "--json"]
        if database_url:
            args += ["--database-url", database_url]
        out = server.cli(args)
        server.url, server.ca_file, server.root_token = out["url"], out["ca_file"], out["root_token"]
        server._ssl = ssl.create_default_context(cafile=server.ca_file)
        return server

    def cli(self, args: list[str], token: str = "") -> Any:
        env = _clean_env(KEYSTEWARD_DATA_DIR=str(self.data_dir), **({"KEYSTEWARD_TOKEN": token} if token else {}))
        done = subprocess.run(
            [*keysteward_cli(), *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"keysteward {' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout)

    def start(
        self, cleanup: Cleanup, timeout: float = 60.0, workers: int = 1, env: dict[str, str] | None = None
    ) -> None:
        """Start the server; ``env`` adds ``KEYSTEWARD_*`` overrides (e.g. ``KEYSTEWARD_RELEASE_NONCE_TTL_SECONDS``)."""
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*keysteward_cli(), "server", "start"],
            env=_clean_env(
                **(env or {}), KEYSTEWARD_DATA_DIR=str(self.data_dir), KEYSTEWARD_SERVER_WORKERS=str(workers)
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        cleanup.push(f"stop keysteward server {self.proc.pid}", self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"keysteward server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.request("GET", "/v1/health")
                if status == 200 and not body.get("sealed", True):
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise BenchError(f"keysteward server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def forget_log(self, failed: bool) -> None:
        """Remove the server log; after a failed run first print its warnings and errors (the cause of a
        non-2xx answer wrk cannot show)."""
        if failed:
            try:
                text = self.log_path.read_text(errors="replace")
            except OSError:
                text = ""
            noted = [line for line in text.splitlines() if '"level": "warning"' in line or '"level": "error"' in line]
            for line in noted[-40:]:
                print(f"server log: {line[:500]}", file=sys.stderr, flush=True)
        self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def request(self, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        if not self.url.startswith("https://"):
            raise BenchError(f"unexpected server URL {self.url!r}")
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 - https only
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=30) as resp:  # noqa: S310 - our https URL
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def post_ok(self, path: str, body: Any, token: str) -> Any:
        status, answer = self.request("POST", path, body, token)
        if status >= 300:
            raise BenchError(f"POST {path} answered {status}: {answer}")
        return answer
