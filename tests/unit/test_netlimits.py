"""keysteward.netlimits: the limits' own checks and where connections are counted (the caps themselves are
played against a real server in tests/e2e/test_http_limits.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keysteward.errors import BadRequest
from keysteward.netlimits import Limits, source_of
from keysteward.server.run import listener_limits
from keysteward.settings import load

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "bad",
    [
        {"max_connections": 0},
        {"max_connections_per_source": -1},
        {"max_header_bytes": True},
        {"max_headers": 1.5},
        {"header_timeout": 0},
        {"body_timeout": -3.0},
        {"header_timeout": 1e9},
        {"body_timeout": "30"},
    ],
)
def test_bad_limits_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(BadRequest) as caught:
        Limits(**bad)  # type: ignore[arg-type]
    assert caught.value.code == "bad_setting"


def test_limits_come_from_settings_and_environment(tmp_path: Path) -> None:
    env = {"KEYSTEWARD_SERVER_MAX_HEADERS": "20", "KEYSTEWARD_SERVER_HEADER_TIMEOUT": "2.5",
           "KEYSTEWARD_SERVER_MAX_CONNECTIONS_PER_SOURCE": "7"}  # fmt: skip
    limits = listener_limits(load(tmp_path, env=env))
    assert (limits.max_headers, limits.header_timeout, limits.max_connections_per_source) == (20, 2.5, 7)
    assert listener_limits(load(tmp_path, env={})) == Limits()
    with pytest.raises(BadRequest):
        listener_limits(load(tmp_path, env={"KEYSTEWARD_SERVER_MAX_CONNECTIONS": "0"}))
    with pytest.raises(BadRequest):
        load(tmp_path, env={"KEYSTEWARD_SERVER_BODY_TIMEOUT": "soon"})


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        (("192.0.2.7", 5555), "192.0.2.7"),
        (("2001:db8:1:2:3:4:5:6", 5555, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff::1", 1, 0, 0), "2001:db8:1:2::/64"),
        (("::ffff:192.0.2.9", 1, 0, 0), "192.0.2.9"),
        (("fe80::1%eth0", 1, 0, 2), "fe80::/64"),
        ("/run/keysteward.sock", "local"),
        (None, "local"),
        ((), "local"),
        (("not an address", 1), "not an address"),
        ((b"bytes", 1), "local"),
    ],
)
def test_source_of(peer: object, source: str) -> None:
    assert source_of(peer) == source


@given(st.one_of(st.none(), st.text(max_size=300), st.tuples(st.text(max_size=300), st.integers())))
def test_source_of_any_peer_is_a_short_string(peer: object) -> None:
    assert len(source_of(peer)) <= 64
