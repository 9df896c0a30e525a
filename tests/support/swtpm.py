"""A real software TPM for the tests: swtpm on free loopback ports, optionally manufactured like a real one.

:func:`running_swtpm` starts ``swtpm socket --tpm2`` on a fresh state directory (or one that
:func:`provision` manufactured with ``swtpm_setup``: an EK, its certificate in NV 0x01c00002 and a
platform certificate, issued by swtpm-localca from a CA of the test's own, never the system's
/var/lib/swtpm-localca) and stops it afterwards. tpm2-tools reach it through :attr:`Swtpm.tcti`.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.tools import tool

START_TRIES = 5
READY_SECONDS = 10.0


@dataclass(frozen=True)
class LocalCa:
    """swtpm-localca's CA in ``directory``: a self-signed root and the intermediate that signs EK certificates."""

    directory: Path

    @property
    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.directory / "swtpm-localca-rootca-cert.pem").read_bytes())

    @property
    def issuer(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.directory / "issuercert.pem").read_bytes())


@dataclass
class Swtpm:
    state_dir: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def provision(state_dir: Path, ca_dir: Path) -> LocalCa:
    """Manufacture a TPM state in ``state_dir`` with EK and platform certificates from the CA in ``ca_dir``.

    The CA is created on first use and shared by every TPM provisioned with the same ``ca_dir``.
    """
    setup = tool("swtpm_setup", "swtpm-tools")
    localca = tool("swtpm_localca", "swtpm-tools")
    tool("certtool", "gnutls-bin")
    ca_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    (ca_dir / "localca.conf").write_text(
        f"statedir = {ca_dir}\nsigningkey = {ca_dir}/signkey.pem\n"
        f"issuercert = {ca_dir}/issuercert.pem\ncertserial = {ca_dir}/certserial\n"
    )
    (ca_dir / "localca.options").write_text(
        "--platform-manufacturer keysteward-tests\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    (ca_dir / "swtpm_setup.conf").write_text(
        f"create_certs_tool = {localca}\ncreate_certs_tool_config = {ca_dir}/localca.conf\n"
        f"create_certs_tool_options = {ca_dir}/localca.options\nactive_pcr_banks = sha256\n"
    )
    argv = [setup, "--tpm2", "--tpmstate", str(state_dir), "--create-ek-cert", "--create-platform-cert"]
    argv += ["--config", str(ca_dir / "swtpm_setup.conf"), "--pcr-banks", "sha256", "--overwrite"]
    done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        pytest.fail(f"swtpm_setup exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    return LocalCa(ca_dir)


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on loopback right now (swtpm's server and control ports)."""
    for _ in range(200):
        port = random.randrange(20000, 60000, 2)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 1):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    pytest.fail("no two adjacent free TCP ports on 127.0.0.1 for swtpm")


def _ready(process: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port + 1), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def start(state_dir: Path) -> Swtpm:
    """Start swtpm on ``state_dir`` (made if missing), TPM2 started up (startup-clear), on free ports."""
    binary = tool("swtpm", "swtpm")
    state_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(START_TRIES):
        port = _free_port_pair()
        argv = [binary, "socket", "--tpm2", "--tpmstate", f"dir={state_dir.resolve()}"]
        argv += ["--server", f"type=tcp,port={port},bindaddr=127.0.0.1"]
        argv += ["--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"]
        with open(state_dir / "swtpm.log", "ab") as log:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        if _ready(process, port):
            return Swtpm(state_dir, port, process)
        Swtpm(state_dir, port, process).stop()
    pytest.fail(f"swtpm did not start on {state_dir} after {START_TRIES} tries")


@contextlib.contextmanager
def running_swtpm(state_dir: Path, ca_dir: Path | None = None) -> Iterator[tuple[Swtpm, LocalCa | None]]:
    """A running swtpm for the ``with`` block; manufactured with certificates from ``ca_dir`` if given."""
    tool("tpm2_startup", "tpm2-tools")
    ca = provision(state_dir, ca_dir) if ca_dir is not None else None
    tpm = start(state_dir)
    try:
        yield tpm, ca
    finally:
        tpm.stop()
