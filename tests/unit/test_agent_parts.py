"""The agent's pure parts: the KSR1 release plaintext, HPKE info, the config file, grace arithmetic, log lines."""

from __future__ import annotations

import json
import os

import pytest

from keysteward.agent.client import LEASE_TOKEN_SIZE, parse_plaintext, release_info
from keysteward.agent.config import parse_config
from keysteward.agent.daemon import effective_grace, lock_deadline
from keysteward.agent.process import logline
from keysteward.crypto.hpke import OneTimeKey, seal
from keysteward.errors import BadRequest, KeystewardError

pytestmark = pytest.mark.unit


# -- KSR1 ------------------------------------------------------------------------------------------


def test_plaintext_splits_into_secret_and_lease_token() -> None:
    secret, lease = os.urandom(32), os.urandom(LEASE_TOKEN_SIZE)
    plaintext = bytearray(b"KSR1" + bytes([32]) + secret + lease)
    got_secret, got_lease = parse_plaintext(plaintext)
    assert got_secret.bytes() == secret and got_lease.bytes() == lease
    assert plaintext == bytearray(len(plaintext))  # wiped
    got_secret.wipe()
    got_lease.wipe()
    assert got_secret.closed and got_lease.closed


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",
        b"KSR1",
        b"KSR2" + bytes([32]) + bytes(64),
        b"KSR1" + bytes([0]) + bytes(32),
        b"KSR1" + bytes([32]) + bytes(63),
        b"KSR1" + bytes([32]) + bytes(65),
        b"KSR1" + bytes([255]) + bytes(64),
    ],
)
def test_bad_plaintext_refused_and_wiped(plaintext: bytes) -> None:
    data = bytearray(plaintext)
    with pytest.raises(KeystewardError) as caught:
        parse_plaintext(data)
    assert caught.value.code == "kms_protocol"
    assert not any(data)


def test_info_and_sealed_roundtrip() -> None:
    info = release_info("acme", "0b7a4a53-54c4-4fb0-8d0e-5b8f7c1e2a11", "lease-1")
    assert info == b"keysteward-release/1\x00acme\x000b7a4a53-54c4-4fb0-8d0e-5b8f7c1e2a11\x00lease-1"
    for suite in ("x25519", "mlkem768-x25519"):
        key = OneTimeKey.generate(suite)
        body = b"KSR1" + bytes([32]) + bytes(range(32)) + bytes(32)
        sealed = seal(suite, key.public_bytes, body, info)
        secret, lease = parse_plaintext(key.open(sealed, info))
        assert secret.bytes() == bytes(range(32)) and lease.bytes() == bytes(32)
        with pytest.raises(KeystewardError):
            key.open(sealed, release_info("acme", "other", "lease-1"))  # info binds tenant, volume, lease


# -- config ----------------------------------------------------------------------------------------


def test_config_parses_crypttab_lines() -> None:
    entries = parse_config(
        "# name path options\n"
        "\n"
        "data1  /dev/vdb   identity=gcp-jwt,audience=https://kms,metadata=http://127.0.0.1:9/x,suite=mlkem768-x25519\n"
        "logs\t/srv/logs.img  url=https://kms:8443,ca=/etc/ks/ca.pem,grace=0,mode=userspace,timeout=3  # trailing\n"
        "plain /srv/p.img -\n"
        "bare /srv/b.img\n"
        "old /srv/o.img kms=https://old:8443\n"
    )
    assert [e.name for e in entries] == ["data1", "logs", "plain", "bare", "old"]
    data1, logs, plain, bare, old = entries
    assert old.options.kms_url == "https://old:8443", "kms= still works, the old spelling of url="
    assert data1.options.identity == "gcp-jwt" and data1.options.audience == "https://kms"
    assert data1.options.metadata_url == "http://127.0.0.1:9/x" and data1.options.suite == "mlkem768-x25519"
    assert data1.options.name == "data1" and data1.line == 3 and data1.grace_seconds is None
    assert logs.options.kms_url == "https://kms:8443" and logs.options.ca_file == "/etc/ks/ca.pem"
    assert logs.grace_seconds == 0 and logs.options.mode == "userspace" and logs.options.timeout == 3
    assert plain.options.identity == "aws-iid" and plain.options.kms_url is None and bare.path == "/srv/b.img"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("only-a-name\n", "NAME PATH"),
        ("a /x opts extra\n", "NAME PATH"),
        ("a relative/path\n", "not absolute"),
        ("-bad /x\n", "name"),
        ("a /x\na /y\n", "twice"),
        ("a /x colour=blue\n", "unknown option"),
        ("a /x kms\n", "KEY=VALUE"),
        ("a /x kms=ftp://x\n", "http(s)"),
        ("a /x url=ftp://x\n", "http(s)"),
        ("a /x url=https://a,kms=https://b\n", "twice"),
        ("a /x identity=azure\n", "identity"),
        ("a /x suite=rsa\n", "suite"),
        ("a /x mode=kernel\n", "mode"),
        ("a /x grace=soon\n", "number"),
        ("a /x grace=-1\n", "range"),
        ("a /x ca=/a,ca=/b\n", "twice"),
    ],
)
def test_config_errors_name_their_line(text: str, needle: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_config("# header\n" + text, source="volumes")
    assert caught.value.code == "agent_config"
    assert "volumes line 2" in caught.value.message or "volumes line 3" in caught.value.message
    assert needle in caught.value.message


# -- grace -----------------------------------------------------------------------------------------


def test_deadline_is_the_expiry_while_renewals_succeed() -> None:
    for grace in (None, 0.0, 5.0):
        assert lock_deadline(expires=130, last_success=100, failing_since=None, grace=grace) == 130


def test_grace_when_unreachable() -> None:
    # null: keep the volume open until the lease expires
    assert lock_deadline(expires=130, last_success=100, failing_since=110, grace=None) == 130
    # 0: lock at the first failed renewal
    assert lock_deadline(expires=130, last_success=100, failing_since=110, grace=0) == 110
    # N: N seconds past the last successful renewal...
    assert lock_deadline(expires=130, last_success=100, failing_since=110, grace=15) == 115
    # ...capped at the lease expiry
    assert lock_deadline(expires=130, last_success=100, failing_since=110, grace=600) == 130


def test_effective_grace_is_the_stricter() -> None:
    assert effective_grace(None, None) is None
    assert effective_grace(None, 5) == 5
    assert effective_grace(20, None) == 20
    assert effective_grace(20, 5) == 5 and effective_grace(3, 5) == 3


def test_log_lines_are_key_value_records() -> None:
    line = logline("renew_failed", volume="data 1", code="kms_unreachable", grace=None, lock_in=2.5, n=json.dumps("x"))
    assert line == 'event=renew_failed volume="data 1" code=kms_unreachable lock_in=2.5 n="\\"x\\""'


def test_shipped_example_config_parses() -> None:
    from pathlib import Path

    example = Path(__file__).parents[2] / "packaging" / "volumes.example"
    entries = parse_config(example.read_text(), source=str(example))
    assert [e.name for e in entries] == ["data", "logs", "scratch"]
    assert entries[1].options.identity == "gcp-jwt" and entries[1].grace_seconds == 60
    assert entries[2].grace_seconds == 0 and entries[2].options.ca_file == "/etc/keysteward/ca.pem"
