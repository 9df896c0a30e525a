"""``keysteward devcloud`` end to end: the real command in subprocesses, the service over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from keysteward.agent.evidence import EvidenceUnavailable, collect_identity
from keysteward.attest.binding import binding
from keysteward.attest.identity import ProviderTrust, verify_identity
from tests.fixtures.keysteward import KEYSTEWARD

pytestmark = pytest.mark.integration

AUD = "https://kms.example:8443"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([KEYSTEWARD, "devcloud", *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"keysteward devcloud {' '.join(args)} failed: {done.stderr}")
    return done


def cli_json(*args: str) -> object:
    return json.loads(cli(*args, "--json").stdout)


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Path, str, subprocess.Popen[str]]]:
    state = tmp_path / "dc"
    cli("init", "--state", str(state))
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [KEYSTEWARD, "devcloud", "serve", "--state", str(state), "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().endswith("\n")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "devcloud serve did not write its port file"
            time.sleep(0.05)
        url = port_file.read_text().strip()
        assert proc.stdout is not None and proc.stdout.readline().strip() == url
        yield state, url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


def test_devcloud_end_to_end(serving: tuple[Path, str, subprocess.Popen[str]], tmp_path: Path) -> None:
    state, url, proc = serving
    assert url.startswith("http://127.0.0.1:") and httpx.get(url + "/").status_code == 200
    pem = cli("certificate", "--state", str(state)).stdout
    assert pem.startswith("-----BEGIN CERTIFICATE-----") and pem == (state / "signing-cert.pem").read_text()
    made = cli_json("instance", "create", "--state", str(state), "--account", "123456789012", "--zone", "dev-east-1c")
    assert isinstance(made, dict)
    assert made["metadata_url"] == f"{url}/{made['id']}" and made["state"] == "running"
    human = cli("instance", "create", "--state", str(state)).stdout.split()
    assert human[0].startswith("i-") and human[1] == f"{url}/{human[0]}"

    trusts = [
        ProviderTrust.from_pem("devcloud", "aws-iid", pem, None),
        ProviderTrust.from_pem("devcloud", "gcp-jwt", pem, AUD),
    ]
    for kind in ("aws-iid", "gcp-jwt"):
        bind = binding(os.urandom(41), os.urandom(32))
        evidence = collect_identity(made["metadata_url"], kind, bind, audience=AUD)
        identity = verify_identity(evidence, trusts, binding=bind, now=datetime.now(UTC), audience=AUD)
        assert identity.key() == f"devcloud/123456789012/{made['id']}"
        assert identity.zone.startswith("dev-east-1")

    clone = cli_json("instance", "clone", made["id"], "--state", str(state))
    assert isinstance(clone, dict) and clone["cloned_from"] == made["id"] and clone["account"] == "123456789012"
    cli("instance", "terminate", made["id"], "--state", str(state))
    with pytest.raises(EvidenceUnavailable, match="404"):
        collect_identity(made["metadata_url"], "aws-iid", os.urandom(32), audience=None)
    bind = os.urandom(32)
    evidence = collect_identity(clone["metadata_url"], "aws-iid", bind, audience=None)  # the clone still answers
    assert (
        verify_identity(evidence, trusts, binding=bind, now=datetime.now(UTC), audience=AUD).instance_id == clone["id"]
    )

    listed = cli_json("instance", "list", "--state", str(state))
    assert isinstance(listed, list)
    assert {(i["id"], i["state"]) for i in listed} >= {(made["id"], "terminated"), (clone["id"], "running")}
    assert len(listed) == 3

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not (tmp_path / "port").exists() and not (state / "server.url").exists()
    after = cli_json("instance", "create", "--state", str(state))
    assert isinstance(after, dict) and after["metadata_url"] is None


def test_devcloud_errors_are_one_line(tmp_path: Path) -> None:
    state = tmp_path / "dc"
    missing = cli("instance", "list", "--state", str(state), check=False)
    assert missing.returncode == 1 and "devcloud init" in missing.stderr and "Traceback" not in missing.stderr
    cli("init", "--state", str(state))
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    for args in (
        ("init",),
        ("instance", "terminate", "i-00000000000000000"),
        ("instance", "clone", "i-00000000000000000"),
        ("instance", "create", "--account", "a/b"),
    ):
        done = cli(*args, "--state", str(state), check=False)
        assert done.returncode == 1, args
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before  # bad input changed nothing
    assert (state / "signing-key.pem").stat().st_mode & 0o077 == 0
