"""Attacks on the audit log against a real ``keysteward server start`` process (SQLite), through the CLI.

The server publishes signed checkpoints of its chain heads to a file sink outside its database. Then,
as a thief of the database or of an export would: (a) delete the newest records and reset the head,
then let the server write on top; (b) append an unsigned hand-made record to an export and to the
database; (c) tamper with the checkpoint file. ``audit verify`` must fail each time, non-zero, on one
line with a stable code. A flood of denials must not push real events out of ``audit list``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from keysteward.audit import chain, checkpoint
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager

pytestmark = pytest.mark.e2e
INTERVAL = "0.5"


@dataclass
class Audited:
    server: ServerProcess
    admin: str
    auditor: str
    public_key: str
    tenant_id: str
    checkpoints: Path
    db_path: Path

    def verify(self, *args: str) -> tuple[int, str, str]:
        r = self.server.cli("audit", "verify", "--public-key", self.public_key, *args, token=self.auditor, check=False)
        return r.returncode, r.stdout, r.stderr

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=30, isolation_level=None)

    def head(self) -> tuple[int, str]:
        with self.db() as conn:
            row = conn.execute("SELECT seq, hash FROM audit_heads WHERE tenant_id=?", (self.tenant_id,)).fetchone()
        return int(row[0]), str(row[1])

    def published(self) -> int:
        """The newest seq of this chain in the checkpoint file (0 before the first)."""
        if not self.checkpoints.exists():
            return 0
        key = _public(self.public_key)
        mine = checkpoint.read(self.checkpoints.read_bytes().splitlines(), key, self.tenant_id)
        return max(mine, default=0)

    def settle(self, timeout: float = 20) -> int:
        """Wait until the checkpoint file holds the current head (no background record pending)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seq, _ = self.head()
            if seq and self.published() == seq:
                time.sleep(float(INTERVAL) * 2)
                if self.head()[0] == seq:
                    return seq
            time.sleep(0.1)
        raise AssertionError(f"no checkpoint of head {self.head()} in {self.checkpoints} after {timeout} s")


def _public(hex_key: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))


def one_error_line(stderr: str, code: str) -> None:
    assert stderr.count("\n") == 1, stderr
    assert f"({code})" in stderr and "Traceback" not in stderr, stderr


@pytest.fixture
def served(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> Audited:
    """A server with a file checkpoint sink, a tenant, an auditor and a few records (some destroys)."""
    data = tmp_path / "ks"
    out = init_manager(data, secret_registry)
    sink = tmp_path / "outside" / "checkpoints.jsonl"
    sink.parent.mkdir()
    env = {"KEYSTEWARD_AUDIT_CHECKPOINT_SINKS": f"file:{sink}", "KEYSTEWARD_AUDIT_CHECKPOINT_INTERVAL": INTERVAL}
    server = server_factory(data, env=env)
    root = out.root_token.secret
    admin = server.cli_json("tenant", "create", "acme", token=root)["admin_token"]["token"]
    auditor = server.cli_json("token", "create", "audrey", "--role", "auditor", token=admin)["token"]
    server.cli("key", "create", "orders", token=admin)
    server.cli("key", "create", "scratch", token=admin)
    server.cli("key", "destroy", "scratch", "--yes", token=admin)
    with sqlite3.connect(data / "keysteward.db") as conn:
        tenant_id = conn.execute("SELECT id FROM tenants WHERE name='acme'").fetchone()[0]
    return Audited(server, admin, auditor, out.result.audit_public_key, tenant_id, sink, data / "keysteward.db")


@pytest.fixture
def audited(served: Audited) -> Audited:
    """:func:`served`, once its current head is in the checkpoint file."""
    served.settle()
    return served


def test_intact_log_verifies_against_its_checkpoints(audited: Audited) -> None:
    rc, out, err = audited.verify("--checkpoint", str(audited.checkpoints), "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] is True and report["checkpoints"] >= 1
    assert report["checkpoint_seq"] == report["head_seq"] and report["unsigned_tail"] == 0
    # --checkpoint checks signatures against the pinned key only: without one it refuses to start
    bare = audited.server.cli(
        "audit", "verify", "--checkpoint", str(audited.checkpoints), token=audited.auditor, check=False
    )
    assert bare.returncode == 1 and "--public-key" in bare.stderr


def test_a_key_destroy_publishes_a_checkpoint_at_once(audited: Audited) -> None:
    """The interval is 0.5 s in these tests: restart with an hour and a destroy still publishes."""
    audited.server.stop()
    audited.server.env["KEYSTEWARD_AUDIT_CHECKPOINT_INTERVAL"] = "3600"
    audited.server.start()
    audited.server.cli("key", "create", "doomed", token=audited.admin)
    before = audited.published()
    audited.server.cli("key", "destroy", "doomed", "--yes", token=audited.admin)
    seq, _ = audited.head()
    deadline = time.monotonic() + 10
    while audited.published() < seq:
        assert time.monotonic() < deadline, f"no checkpoint of the destroy (published {before}, head {seq})"
        time.sleep(0.05)


def test_attack_deleting_the_newest_records_and_resetting_the_head(audited: Audited, tmp_path: Path) -> None:
    head, _ = audited.head()
    with audited.db() as conn:
        conn.execute("DELETE FROM audit_records WHERE tenant_id=? AND seq > ?", (audited.tenant_id, head - 2))
        kept = conn.execute(
            "SELECT hash FROM audit_records WHERE tenant_id=? AND seq=?", (audited.tenant_id, head - 2)
        ).fetchone()[0]
        conn.execute("UPDATE audit_heads SET seq=?, hash=? WHERE tenant_id=?", (head - 2, kept, audited.tenant_id))
    held = tmp_path / "held.jsonl"  # what the operator's file sink held when the records went
    shutil.copy(audited.checkpoints, held)

    # without an outside anchor the shortened log is indistinguishable from an honest one
    rc, out, _ = audited.verify("--json")
    assert rc == 0 and json.loads(out)["head_seq"] == head - 2
    # against the published checkpoints it fails, on one line, with a stable code
    rc, out, err = audited.verify("--checkpoint", str(held))
    assert rc == 1, out
    one_error_line(err, "audit_log_truncated")
    assert f"ends at record {head - 2}" in err and f"record {head}" in err
    rc, out, _ = audited.verify("--checkpoint", str(held), "--json")
    assert rc == 1 and json.loads(out)["code"] == "audit_log_truncated"

    # the server writes on top of the reset head: as long as before, but not the log that was published
    for name in ("refill-1", "refill-2", "refill-3"):
        audited.server.cli("key", "create", name, token=audited.admin)
    assert audited.head()[0] > head
    rc, _, err = audited.verify("--checkpoint", str(held))
    assert rc == 1
    one_error_line(err, "audit_checkpoint_mismatch")


def test_attack_appending_an_unsigned_record_to_an_export(served: Audited, tmp_path: Path) -> None:
    audited = served
    export = tmp_path / "audit.jsonl"
    audited.server.cli("audit", "export", "--output", str(export), token=audited.auditor)
    last = json.loads(export.read_text().splitlines()[-1])
    body = chain.make_body(
        seq=last["seq"] + 1,
        prev=last["hash"],
        ts="2030-01-01T00:00:00.000000+00:00",
        actor="token:acme/admin/admin",
        action="key.create",
        target="key:innocent",
        outcome="ok",
        reason="",
        details={},
    )
    forged = {**last, "seq": last["seq"] + 1, "body": body, "hash": chain.link_hash(body), "signature": None}
    with export.open("a") as fh:
        fh.write(json.dumps(forged, sort_keys=True) + "\n")

    rc, out, err = audited.verify("--file", str(export))
    assert rc == 1, out
    one_error_line(err, "audit_unsigned_tail")
    assert f"from record {forged['seq']}" in err
    # only when told so (a server that is sealed right now), and then it says how many are unsigned
    rc, out, _ = audited.verify("--file", str(export), "--allow-unsigned-tail", "--json")
    assert rc == 0 and json.loads(out)["unsigned_tail"] == 1

    # the same record written into the database, head moved onto it: the online verify fails too
    with audited.db() as conn:
        conn.execute(
            "INSERT INTO audit_records (tenant_id, seq, body, hash, signature) VALUES (?, ?, ?, ?, NULL)",
            (audited.tenant_id, forged["seq"], body, forged["hash"]),
        )
        conn.execute(
            "UPDATE audit_heads SET seq=?, hash=? WHERE tenant_id=?", (forged["seq"], forged["hash"], audited.tenant_id)
        )
    rc, _, err = audited.verify()
    assert rc == 1
    one_error_line(err, "audit_unsigned_tail")


def test_attack_tampering_with_the_checkpoint_file(audited: Audited, tmp_path: Path) -> None:
    lines = audited.checkpoints.read_text().splitlines()
    mine = [i for i, line in enumerate(lines) if json.loads(line)["tenant_id"] == audited.tenant_id]
    obj = json.loads(lines[mine[-1]])

    # a checkpoint moved back to an older head, to excuse a shortened log: its signature no longer holds
    older = dict(obj, seq=obj["seq"] - 1)
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join([*lines[: mine[-1]], json.dumps(older), *lines[mine[-1] + 1 :]]) + "\n")
    rc, _, err = audited.verify("--checkpoint", str(tampered))
    assert rc == 1
    one_error_line(err, "audit_checkpoint_bad_signature")

    # a checkpoint file made by someone with their own key
    mallory = Ed25519PrivateKey.generate()
    forged = checkpoint.sign(mallory, audited.tenant_id, obj["seq"], obj["hash"], obj["ts"])
    tampered.write_text(checkpoint.encode(forged) + "\n")
    rc, _, err = audited.verify("--checkpoint", str(tampered))
    assert rc == 1
    one_error_line(err, "audit_checkpoint_bad_signature")

    # damaged lines: cut short, or far too long
    for text in (lines[mine[-1]][:-20], json.dumps(dict(obj, tenant_id="x" * 5000))):
        tampered.write_text(text + "\n")
        rc, _, err = audited.verify("--checkpoint", str(tampered))
        assert rc == 1
        one_error_line(err, "audit_checkpoint_invalid")

    # a file without this chain's checkpoints (another tenant's, or none) proves nothing
    others = [line for line in lines if json.loads(line)["tenant_id"] != audited.tenant_id]
    tampered.write_text("\n".join(others) + "\n")
    rc, _, err = audited.verify("--checkpoint", str(tampered))
    assert rc == 1
    one_error_line(err, "audit_checkpoint_missing")


def test_a_flood_of_denials_does_not_hide_real_events(served: Audited) -> None:
    audited = served
    flooder = audited.server.cli_json("token", "create", "flood", "--role", "auditor", token=audited.admin)["token"]
    for i in range(12):
        denied = audited.server.cli("key", "create", f"nope-{i}", token=flooder, check=False)
        assert denied.returncode == 1
    last = audited.server.cli_json("audit", "list", "--last", "10", token=audited.auditor)
    assert {r["outcome"] for r in last} == {"denied"}  # the newest ten are all the flood
    real = audited.server.cli_json("audit", "list", "--outcome", "ok", "--last", "0", token=audited.auditor)
    assert {"key.create", "key.destroy"} <= {r["action"] for r in real}
    assert {r["outcome"] for r in real} == {"ok"}
    admins = audited.server.cli_json(
        "audit", "list", "--actor", "token:acme/admin/*", "--last", "0", token=audited.auditor
    )
    assert admins and all(r["actor"].startswith("token:acme/admin/") for r in admins)
    assert "key.destroy" in {r["action"] for r in admins}
    flood = audited.server.cli_json(
        "audit", "list", "--actor", "*/flood", "--outcome", "denied", "--last", "0", token=audited.auditor
    )
    assert len(flood) == 12
    bad = audited.server.cli("audit", "list", "--outcome", "maybe", token=audited.auditor, check=False)
    assert bad.returncode == 1 and "maybe" in bad.stderr and "Traceback" not in bad.stderr
