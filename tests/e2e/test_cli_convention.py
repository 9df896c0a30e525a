"""One CLI convention (docs/cli.md) against a real server process: token expiry, audit filters, policy
errors at the first mistake, several files after ``policy test --proposed``, and the renamed flags whose
old spellings still work but are gone from ``--help``.

Attacks played: a token used past its ``--ttl`` (every request after the expiry must be refused with
401, the server's one-second token cache included); a malformed ``--ttl``, ``--since`` or label that must
change nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.fixtures.keysteward import KEYSTEWARD, SecretRegistry, ServerProcess, init_manager

pytestmark = pytest.mark.e2e
ZONED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
RELEASE_REQUEST = {
    "tenant": "acme",
    "action": "release",
    "principal": {"type": "Instance", "provider": "aws", "account": "111122223333", "instance_id": "i-0abc"},
    "resource": {"type": "Volume", "id": "0b6f4a7e-1111-4c2d-9e8f-000000000001", "name": "data", "key": "k1",
                 "binding": {"provider": "aws", "account": "111122223333"}},
    "identity": {"provider": "aws", "kind": "aws-iid", "account": "111122223333", "instance_id": "i-0abc"},
    "platform": {"tee": "none"},
    "time": "2026-11-23T10:00:00Z",
}  # fmt: skip


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> tuple[
    ServerProcess, str
]:  # fmt: skip
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    with server.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    return server, admin


def _help(*args: str) -> str:
    done = subprocess.run([KEYSTEWARD, *args, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_token_past_its_ttl_is_refused(site: tuple[ServerProcess, str], secret_registry: SecretRegistry) -> None:
    server, admin = site
    made = server.cli_json("token", "create", "brief", "--role", "auditor", "--ttl", "3s", token=admin)
    secret_registry.secret(made["token"].encode(), "short-lived token")
    expires = datetime.fromisoformat(made["expires_at"])
    assert timedelta(seconds=2) < expires - datetime.now(UTC) <= timedelta(seconds=3)
    listed = server.cli("token", "list", token=admin).stdout
    row = next(line for line in listed.splitlines() if "brief" in line)
    assert len(ZONED.findall(row)) == 2, row  # created_at and expires_at, each with its zone
    assert [t["expires_at"] for t in server.cli_json("token", "list", token=admin) if t["name"] == "admin"] == [None]

    accepted_after_expiry, refused_at = [], None
    with server.http(made["token"]) as c:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sent = datetime.now(UTC)  # the server checks the expiry after this instant
            answer = c.get("/whoami")
            now = datetime.now(UTC)
            if answer.status_code == 200 and sent > expires:
                accepted_after_expiry.append(sent)
            if answer.status_code == 401:
                refused_at = now
                break
            assert answer.status_code == 200, answer.text
            time.sleep(0.05)
    assert not accepted_after_expiry, "an expired token was accepted (the token cache must not outlive the expiry)"
    assert refused_at is not None and refused_at >= expires
    late = server.cli("whoami", token=made["token"], check=False)
    assert late.returncode == 1 and "bad_token" in late.stderr

    for bad in ("30", "0s", "1.5h", "forever"):
        refused = server.cli("token", "create", "never", "--role", "auditor", "--ttl", bad, token=admin, check=False)
        assert refused.returncode == 2 and "--ttl" in refused.stderr, refused.stderr
    assert "never" not in [t["name"] for t in server.cli_json("token", "list", token=admin)]
    with server.http(admin) as c:
        too_long = c.post("/tokens", json={"name": "ages", "role": "auditor", "ttl_seconds": 11 * 366 * 86400})
    assert too_long.status_code in (400, 422), too_long.text


def test_audit_list_filters_by_action_and_time(site: tuple[ServerProcess, str]) -> None:
    server, admin = site
    server.cli("key", "create", "orders", token=admin)
    server.cli("token", "create", "auditor1", "--role", "auditor", token=admin)
    tokens = server.cli_json("audit", "list", "--action", "token.*", token=admin)
    assert tokens and {r["action"] for r in tokens} == {"token.create"}
    both = server.cli_json("audit", "list", "--action", "token.*", "--action", "key.*", token=admin)
    assert {r["action"] for r in both} >= {"token.create", "key.create"}
    assert not {r["action"] for r in both} - {a for a in {r["action"] for r in both} if a[:4] in ("toke", "key.")}
    everything = server.cli_json("audit", "list", "--last", "0", token=admin)
    assert server.cli_json("audit", "list", "--last", "0", "--since", "1h", token=admin) == everything
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert server.cli_json("audit", "list", "--since", future, token=admin) == []
    middle = everything[len(everything) // 2]["ts"]
    since = server.cli_json("audit", "list", "--last", "0", "--since", middle, token=admin)
    assert since and since[0]["ts"] == middle and since == [r for r in everything if r["ts"] >= middle]
    for bad in ("yesterday", "2026-13-01", "30"):
        refused = server.cli("audit", "list", "--since", bad, token=admin, check=False)
        assert refused.returncode == 2 and "--since" in refused.stderr, refused.stderr


def test_a_policy_typo_is_named_at_its_line(site: tuple[ServerProcess, str], tmp_path: Path) -> None:
    server, admin = site
    typo = tmp_path / "typo.cedar"
    typo.write_text(
        'permit (principal is Keysteward::Instance, action == Keysteward::Action::"release", resource)\n'
        'when { principal.acount == "111122223333" &&\n'
        '  principal has image_id && principal.image_id == "img" };\n'
    )
    refused = server.cli("policy", "set", str(typo), token=admin, check=False)
    assert refused.returncode == 1 and "policy_invalid" in refused.stderr
    assert "typo.cedar:2:18" in refused.stderr and "unknown attribute `acount`" in refused.stderr
    assert "did you mean `account`" in refused.stderr
    assert "image_id`" not in refused.stderr.split("(attributes:")[0] and "more)" not in refused.stderr

    request = tmp_path / "request.json"
    request.write_text(json.dumps(RELEASE_REQUEST))
    permit, forbid = tmp_path / "permit.cedar", tmp_path / "forbid.cedar"
    permit.write_text('@id("all") permit (principal, action == Keysteward::Action::"release", resource);\n')
    forbid.write_text(
        '@id("aws-no") forbid (principal, action == Keysteward::Action::"release", resource)\n'
        'when { context.identity.provider == "aws" };\n'
    )
    alone = server.cli("policy", "test", "--request", str(request), "--proposed", str(permit), token=admin, check=False)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    for files in ([str(permit), str(forbid)], [str(permit), "--proposed", str(forbid)]):
        both = server.cli("policy", "test", "--request", str(request), "--proposed", *files, token=admin, check=False)
        assert both.returncode == 2 and "aws-no" in both.stdout, both.stdout + both.stderr
    empty = server.cli("policy", "test", "--request", str(request), "--proposed", token=admin, check=False)
    assert empty.returncode == 2 and "--proposed" in empty.stderr


def test_old_flags_work_but_are_not_shown(site: tuple[ServerProcess, str]) -> None:
    server, admin = site
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTEWARD_")}
    env |= {"KEYSTEWARD_TOKEN": admin, "KEYSTEWARD_CA_FILE": str(server.settings.server.tls_ca)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([KEYSTEWARD, *args], env=env, capture_output=True, text=True, timeout=60, check=False)

    assert run("--kms", server.url, "whoami", "--json").returncode == 0
    unreachable = run("--kms", "https://127.0.0.1:9", "whoami")
    assert unreachable.returncode == 1 and "127.0.0.1:9" in unreachable.stderr  # the alias is what is used
    both = run("--url", server.url, "--kms", server.url, "whoami")
    assert both.returncode == 2 and "not both" in both.stderr
    # the global options reach the volume group too (it reads them as their environment variables)
    listed = run("--url", server.url, "volume", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr

    server.cli("key", "create", "app", token=admin)
    new = server.cli_json("crypto", "encrypt", "app", "--plaintext", "x", "--context", "app=a", token=admin)
    old = server.cli_json("crypto", "decrypt", "--ciphertext", new["ciphertext"], "-c", "app=a", token=admin)
    assert old["plaintext"] == "eA=="
    twice = server.cli("crypto", "encrypt", "app", "--plaintext", "x", "--context", "a=1", "-c", "a=2", token=admin,
                       check=False)  # fmt: skip
    assert twice.returncode == 2 and "given twice" in twice.stderr

    hidden = {
        (): ["--kms"],
        ("crypto", "encrypt"): ["-c,", " -c "],
        ("vm", "create"): ["--key "],
        ("xks", "key", "create"): ["--key "],
        ("agent", "unlock"): ["--kms"],
        ("agent", "enroll-tpm"): ["--kms"],
        ("volume", "create"): ["--kms ", "--key ", "--tag", "--kdf", "--pbkdf-iterations"],
        ("volume", "read"): ["--kms"],
    }
    shown = {("vm", "create"): "--key-name", ("xks", "key", "create"): "--key-name", ("agent", "unlock"): "--url",
             ("agent", "enroll-tpm"): "--url", ("volume", "create"): "--pbkdf-force-iterations",
             ("crypto", "encrypt"): "--context"}  # fmt: skip
    for args, old_flags in hidden.items():
        text = _help(*args)
        for flag in old_flags:
            assert flag not in text, (args, flag)
        if args in shown:
            assert shown[args] in text, args


def test_every_group_finds_the_server_from_its_data_dir(site: tuple[ServerProcess, str], tmp_path: Path) -> None:
    """KEYSTEWARD_DATA_DIR alone (no URL, no CA): the volume group too finds the server and trusts its CA."""
    server, admin = site
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTEWARD_")}
    env.update(KEYSTEWARD_DATA_DIR=str(server.data_dir), KEYSTEWARD_TOKEN=admin)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([KEYSTEWARD, *args], env=env, capture_output=True, text=True, timeout=60, check=False)

    assert run("volume", "list", "--json").stdout.strip() == "[]"
    assert json.loads(run("key", "list", "--json").stdout) == []
    # a data dir whose config is not a server's: the URL is not found, said as such, no traceback
    (tmp_path / "empty").mkdir()
    env["KEYSTEWARD_DATA_DIR"] = str(tmp_path / "empty")
    done = run("volume", "list")
    assert done.returncode != 0 and "--url" in done.stderr and "Traceback" not in done.stderr, done.stderr
