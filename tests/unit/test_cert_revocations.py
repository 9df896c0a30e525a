"""The parsers of certificate revocation: ``ca revoke`` targets, and the list the NBD proxy fetches."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from keysteward.crypto import x509ca
from keysteward.errors import BadRequest
from keysteward.keys.cert_revocations import RevokeTarget, parse_target
from keysteward.proxy.revocations import CertRef, Revocations, cert_ref, parse


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("host:proxy-1", RevokeTarget(role="host", name="proxy-1")),
        ("agent:web-1", RevokeTarget(role="agent", name="web-1")),
        ("1a2B", RevokeTarget(serial="1a2b")),
        ("0x00ff", RevokeTarget(serial="ff")),
        ("0a:bc:de", RevokeTarget(serial="abcde")),
        ("0", RevokeTarget(serial="0")),
    ],
)
def test_targets(text: str, want: RevokeTarget) -> None:
    assert parse_target(text) == want


@pytest.mark.parametrize(
    "text",
    ["", "agent:", "host:Bad", "host:a/b", "admin:bob", "xyz", "12 34", "f" * 41, "host", ":", "0x", "a" * 201],
)
def test_bad_targets(text: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_target(text)
    assert caught.value.code in ("bad_revoke_target", "bad_name")


@given(st.text(max_size=80))
def test_any_text_is_a_target_or_a_clear_refusal(text: str) -> None:
    try:
        target = parse_target(text)
    except BadRequest:
        return
    assert (target.serial is None) != (target.role is None)


def test_revocation_list_parses_and_refuses_what_it_names() -> None:
    ca_pem, ca_key = x509ca.new_ca("acme CA 1")
    other_pem, _ = x509ca.new_ca("acme CA 2")
    leaf = x509ca.issue_client_cert(ca_pem, ca_key, tenant="acme", role="agent", name="vm-1")
    der = x509.load_pem_x509_certificate(leaf.cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    ref = cert_ref(der)
    assert ref is not None and ref.serial == leaf.serial and cert_ref(None) is None
    assert not parse({"revoked_serials": [], "retired_cas": []}).refuses(ref)
    assert parse({"revoked_serials": [leaf.serial.upper()], "retired_cas": []}).refuses(ref)
    assert parse({"revoked_serials": [], "retired_cas": [ca_pem]}).refuses(ref)
    assert not parse({"revoked_serials": ["1"], "retired_cas": [other_pem]}).refuses(ref)
    assert not Revocations().refuses(None)
    assert not Revocations(frozenset({"1"})).refuses(CertRef("2", x509.Name([])))


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "x",
        {},
        {"revoked_serials": "ab", "retired_cas": []},
        {"revoked_serials": [], "retired_cas": "pem"},
        {"revoked_serials": [1], "retired_cas": []},
        {"revoked_serials": [""], "retired_cas": []},
        {"revoked_serials": ["f" * 41], "retired_cas": []},
        {"revoked_serials": [], "retired_cas": ["not a pem"]},
        {"revoked_serials": [], "retired_cas": [None]},
    ],
)
def test_bad_revocation_lists_are_refused(body: object) -> None:
    with pytest.raises(BadRequest):
        parse(body)
