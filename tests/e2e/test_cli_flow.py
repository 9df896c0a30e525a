"""The README's path through the real CLI and a real TLS server: init, unseal, tenant, keys, audit verify."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from keysteward.settings import load
from tests.fixtures.keysteward import KEYSTEWARD, SecretRegistry, ServerProcess, free_port
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = pytest.mark.e2e


def test_newcomer_path(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    data = tmp_path / "ks"
    server = server_factory(data, start=False)
    init = json.loads(
        server.cli("server", "init", "--data-dir", str(data), "--listen-port", str(free_port()), "--json").stdout
    )
    assert len(init["unseal_shares"]) == 5 and init["threshold"] == 3 and init["seal_type"] == "shamir"
    # init twice is refused and changes nothing
    again = server.cli("server", "init", "--data-dir", str(data), check=False)
    assert again.returncode != 0 and "already" in again.stderr and "Traceback" not in again.stderr
    server.settings = load(data, env={})
    server.start()
    root = init["root_token"]
    sealed = server.cli("server", "status", "--json", check=False)
    assert sealed.returncode == 2, sealed.stderr  # sealed: exit 2, as Vault's status does
    status = json.loads(sealed.stdout)
    assert status["sealed"] is True
    for share in (init["unseal_shares"][3], init["unseal_shares"][0]):
        assert server.cli_json("server", "unseal", share)["sealed"] is True
    dup = server.cli("server", "unseal", init["unseal_shares"][0], check=False)
    assert dup.returncode == 1 and dup.stderr.count("\n") == 1 and "share_duplicate" in dup.stderr
    out = server.cli("server", "unseal", input=init["unseal_shares"][2] + "\n")  # from stdin, as custodians pipe it
    assert "unsealed" in out.stdout

    admin = server.cli_json("tenant", "create", "acme", token=root)["admin_token"]["token"]
    assert server.cli_json("whoami", token=admin) == {
        "tenant": "acme",
        "role": "admin",
        "name": "admin",
        "kind": "token",
        "person": "admin",
    }
    server.cli("key", "create", "orders-db", token=admin)
    gen = server.cli_json("crypto", "generate-data-key", "orders-db", "--context", "app=orders", token=admin)
    secret_registry.b64(gen["plaintext"], "CLI data key")
    dec = server.cli_json("crypto", "decrypt", "--ciphertext", gen["ciphertext"], "-c", "app=orders", token=admin)
    assert dec["plaintext"] == gen["plaintext"]
    bad = server.cli("crypto", "decrypt", "--ciphertext", gen["ciphertext"], token=admin, check=False)
    assert bad.returncode == 1 and "invalid_ciphertext" in bad.stderr and "Traceback" not in bad.stderr
    assert server.cli_json("key", "rotate", "orders-db", token=admin)["primary_version"] == 2
    assert server.cli_json("key", "describe", "orders-db", token=admin)["versions"][1]["version"] == 2
    auditor = server.cli_json("token", "create", "audrey", "--role", "auditor", token=admin)["token"]
    verify = server.cli_json("audit", "verify", "--public-key", init["audit_public_key"], token=auditor)
    assert verify["ok"] is True and verify["records"] >= 6 and verify["unsigned_tail"] == 0
    export = tmp_path / "audit.jsonl"
    server.cli("audit", "export", "--output", str(export), token=auditor)
    offline = server.cli_json("audit", "verify", "--file", str(export), "--public-key", init["audit_public_key"])
    # (the background rewrap may have appended its record since the online verify)
    assert offline["records"] == len(export.read_text().splitlines()) >= verify["records"]
    assert gen["plaintext"] not in export.read_text()

    # tamper with the database the way a thief of it would: each attack is named at the first bad record
    db = sqlite3.connect(data / "keysteward.db")
    tenant_id = db.execute("SELECT id FROM tenants WHERE name='acme'").fetchone()[0]
    body = db.execute("SELECT body FROM audit_records WHERE tenant_id=? AND seq=4", (tenant_id,)).fetchone()[0]
    db.execute(
        "UPDATE audit_records SET body=? WHERE tenant_id=? AND seq=4", (body.replace('"ok"', '"denied"', 1), tenant_id)
    )
    db.commit()
    broken = server.cli("audit", "verify", "--json", token=auditor, check=False)
    assert broken.returncode == 1 and json.loads(broken.stdout)["first_bad_seq"] == 4
    db.execute("UPDATE audit_records SET body=? WHERE tenant_id=? AND seq=4", (body, tenant_id))
    db.execute("DELETE FROM audit_records WHERE tenant_id=? AND seq=3", (tenant_id,))
    db.commit()
    broken = server.cli("audit", "verify", token=auditor, check=False)
    assert broken.returncode == 1 and "record 3" in broken.stderr
    db.close()

    # seal from the CLI drops the keys: decrypt is refused until unsealed again
    server.cli("server", "seal", token=root)
    sealed = server.cli(
        "crypto", "decrypt", "--ciphertext", gen["ciphertext"], "-c", "app=orders", token=admin, check=False
    )
    assert sealed.returncode == 1 and "sealed" in sealed.stderr


def test_hsm_seal_through_the_cli(
    tmp_path: Path, softhsm: SoftHsmToken, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    data = tmp_path / "ks"
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin)
    server = server_factory(data, start=False)
    init = json.loads(
        server.cli(
            "server",
            "init",
            "--data-dir",
            str(data),
            "--seal",
            "pkcs11",
            "--pkcs11-module",
            softhsm.module_path,
            "--pkcs11-token-label",
            softhsm.token_label,
            "--pkcs11-pin-file",
            str(pin_file),
            "--listen-port",
            str(free_port()),
            "--json",
        ).stdout
    )
    assert init["seal_type"] == "pkcs11" and init["unseal_shares"] == []
    server.settings = load(data, env={})
    # a wrong PIN: the server refuses to start with one clear line, and the PIN is not echoed
    wrong = subprocess.run(
        [KEYSTEWARD, "server", "start"],
        env={**server.env, "KEYSTEWARD_PKCS11_PIN": "31337"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 1 and "hsm_pin_incorrect" in wrong.stderr and "31337" not in wrong.stderr
    assert "Traceback" not in wrong.stderr
    server.start()  # the right PIN from the file: unsealed at start through the HSM
    assert server.cli_json("server", "status")["sealed"] is False
