"""The README's first command: the demo runs end to end on embedded defaults."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.keysteward import SecretRegistry

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_demo_script(tmp_path: Path, secret_registry: SecretRegistry) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTEWARD_")}
    env["KEYSTEWARD_DEMO_DIR"] = str(tmp_path / "demo")
    (tmp_path / "demo").mkdir()
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for expected in (
        "INSECURE",
        "decrypted data key matches the generated one",
        "decrypted with version 1",
        "invalid_ciphertext",
        "read back through the userspace data path",
        "cryptsetup opens it with the same passphrase",
        "audit chain intact",
        "1 MiB written and read back with the released key",
        "agent: volume web-data is open",
        "suspected clone (suspected_clone)",
        "agent: volume web-data is locked",
        "the volume is revoked (volume_revoked)",
        "VM web started on host-a",
        "the guest's RAM marker is nowhere in the snapshot",
        "VM web migrated from host-a to host-b",
        "(drain-host-a) (forbidden_by_policy)",
        "web runs on host-b",
        "(confidential-vms-need-memory-encryption) (forbidden_by_policy)",
        "VM web stopped on host-b",
    ):
        assert expected in done.stdout + done.stderr, expected
    assert "Traceback" not in done.stdout + done.stderr
    secret_registry.place(tmp_path / "demo" / "server.log")
    secret_registry.place(tmp_path / "demo" / "keysteward.db")
    for name in ("agent.log", "agent.json", "devcloud.log", "bound.img", "host-a.log"):
        secret_registry.place(tmp_path / "demo" / name)
