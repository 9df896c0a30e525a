"""A throw-away PostgreSQL 15 cluster on 127.0.0.1 (trust auth, fsync off), for the tests and the benches.

No pytest here: the fixtures in tests/fixtures/postgres.py and bench/_server.py both start clusters with
:func:`start` and turn :class:`PgUnavailable` into their own kind of failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

PG_BINDIR = Path(os.environ.get("KEYSTEWARD_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "32MB",
}


class PgUnavailable(Exception):
    """PostgreSQL could not be started; the message says what to do."""


@dataclass(frozen=True)
class PgCluster:
    host: str
    port: int
    user: str
    socket_dir: Path
    data_dir: Path

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the ``postgres`` database, for CREATE/DROP DATABASE."""
        return psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True)

    def create_database(self, name: str) -> str:
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            run([str(PG_BINDIR / "pg_ctl"), "-D", str(self.data_dir), "stop", "-m", "immediate", "-w"], self.socket_dir)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool; as the ``postgres`` system user when we are root (postgres refuses root)."""
    prefix = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + args, cwd=cwd, capture_output=True, text=True, check=False, timeout=120)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(prefix: str = "ks-pg-") -> PgCluster:
    missing = [t for t in ("initdb", "pg_ctl", "postgres") if not (PG_BINDIR / t).is_file()]
    if missing:
        raise PgUnavailable(
            f"PostgreSQL 15 binaries {missing} not found in {PG_BINDIR}: run `bash scripts/test.sh` "
            "(scripts/bootstrap.sh installs the `postgresql` package)"
        )
    base = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(PG_USER)
        except KeyError as exc:
            shutil.rmtree(base, ignore_errors=True)
            raise PgUnavailable(f"no `{PG_USER}` system user: run `bash scripts/bootstrap.sh`") from exc
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data = base / "data"
    initdb = [str(PG_BINDIR / "initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust"]
    init = run([*initdb, "-E", "UTF8", "--no-locale", "--no-sync"], base)
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise PgUnavailable(f"initdb failed:\n{init.stdout}{init.stderr}")
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(f"unix_socket_directories = '{base}'\n")
        conf.writelines(f"{k} = {v}\n" for k, v in SETTINGS.items())
    log = base / "server.log"
    started = None
    for _attempt in range(3):  # the free port can be taken between probing and binding
        port = _free_port()
        ctl = [str(PG_BINDIR / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60"]
        started = run([*ctl, "-o", f"-p {port}", "start"], base)
        if started.returncode == 0:
            return PgCluster("127.0.0.1", port, PG_USER, base, data)
    text = log.read_text(errors="replace") if log.exists() else ""
    PgCluster("127.0.0.1", 0, PG_USER, base, data).stop()
    assert started is not None
    raise PgUnavailable(f"pg_ctl start failed:\n{started.stdout}{started.stderr}\n{text}")
