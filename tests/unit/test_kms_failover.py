"""The list of key manager URLs and when a client moves along it (keysteward.kms_failover).

The clients that use it (the agent, the CLI, the proxy) fail over between real server processes in
tests/e2e/test_ha_faults.py; here the rule itself, with every kind of failure and bad lists.
"""

from __future__ import annotations

import httpx
import pytest

from keysteward.api_errors import answer_error, transport_error
from keysteward.errors import BadRequest, Conflict, KeystewardError, Unavailable
from keysteward.kms_failover import LOST, MAX_DELAY, NOT_SENT, REFUSED, ROUNDS, Failover, jitter, split_urls
from keysteward.proxy.config import ProxyConfigError, parse_config
from keysteward.volume.errors import VolumeRequestError
from keysteward.volume.kms_token import KmsRef

pytestmark = pytest.mark.unit


def test_split_urls_accepts_lists_and_strips() -> None:
    assert split_urls("https://a:8443, https://b:8443/") == ("https://a:8443", "https://b:8443")
    assert split_urls(["https://a", "http://127.0.0.1:1,https://c"]) == ("https://a", "http://127.0.0.1:1", "https://c")
    assert split_urls("https://only") == ("https://only",)


@pytest.mark.parametrize(
    "bad",
    ["", ",", "https://a,", "https://a,,https://b", "ftp://a", "a:8443", "https://a b", [], ["https://a", ""],
     "http://127.0.0.1:PORT", "https://a:99999", "https://:8443", "https://", "https://[::1"],
)  # fmt: skip
def test_split_urls_refuses_bad_lists(bad: str | list[str]) -> None:
    with pytest.raises(BadRequest) as info:
        split_urls(bad)
    assert info.value.code == "kms_url_invalid"


def test_split_urls_refuses_too_many() -> None:
    with pytest.raises(BadRequest):
        split_urls(",".join(f"https://h{i}" for i in range(17)))


def test_jitter_grows_is_capped_and_never_zero() -> None:
    assert jitter(0, lambda: 0.0) == pytest.approx(0.1) and jitter(0, lambda: 1.0) == pytest.approx(0.2)
    assert jitter(1, lambda: 1.0) == pytest.approx(0.4)
    assert jitter(30, lambda: 1.0) == MAX_DELAY and jitter(30, lambda: 0.0) == MAX_DELAY / 2


def _failing(kinds: dict[str, str | None], calls: list[str]) -> object:
    def op(url: str) -> str:
        calls.append(url)
        kind = kinds.get(url, "ok")
        if kind == "ok":
            return url
        error: KeystewardError = Unavailable(f"{url} failed", code="kms_unreachable")
        error.failover = kind
        raise error

    return op


@pytest.mark.parametrize(
    ("kind", "safe", "moves"),
    [(NOT_SENT, False, True), (NOT_SENT, True, True), (REFUSED, True, True), (REFUSED, False, False),
     (LOST, True, True), (LOST, False, False), (None, True, False)],
)  # fmt: skip
def test_which_failures_move_to_the_next_url(kind: str | None, safe: bool, moves: bool) -> None:
    calls: list[str] = []
    slept: list[float] = []
    failover = Failover(("https://a", "https://b"), sleep=slept.append)
    op = _failing({"https://a": kind}, calls)
    if moves:
        assert failover.run(op, safe=safe) == "https://b"  # type: ignore[arg-type]
        assert calls == ["https://a", "https://b"] and slept == [] and failover.current == "https://b"
    else:
        with pytest.raises(Unavailable):
            failover.run(op, safe=safe)  # type: ignore[arg-type]
        assert calls == ["https://a"]


def test_the_url_that_answered_is_kept() -> None:
    calls: list[str] = []
    failover = Failover(("https://a", "https://b"), sleep=lambda _s: None)
    failover.run(_failing({"https://a": NOT_SENT}, calls), safe=False)  # type: ignore[arg-type]
    failover.run(_failing({}, calls), safe=False)  # type: ignore[arg-type]
    assert calls == ["https://a", "https://b", "https://b"]


def test_all_down_rounds_with_backoff_then_the_last_error() -> None:
    calls: list[str] = []
    slept: list[float] = []
    failover = Failover(("https://a", "https://b"), sleep=slept.append)
    with pytest.raises(Unavailable) as info:
        failover.run(_failing({"https://a": REFUSED, "https://b": REFUSED}, calls), safe=True)  # type: ignore[arg-type]
    assert len(calls) == 2 * ROUNDS and len(slept) == ROUNDS - 1 and "https://b failed" in info.value.message
    assert all(0 < s <= MAX_DELAY for s in slept) and slept[1] > slept[0] * 0.9


def test_a_single_url_is_tried_once() -> None:
    calls: list[str] = []
    with pytest.raises(Unavailable):
        Failover(("https://a",)).run(_failing({"https://a": NOT_SENT}, calls), safe=True)  # type: ignore[arg-type]
    assert calls == ["https://a"]


def test_errors_say_how_they_may_fail_over() -> None:
    assert transport_error(httpx.ConnectError("refused"), "https://a", "x").failover == NOT_SENT
    assert transport_error(httpx.ConnectTimeout("slow"), "https://a", "x").failover == NOT_SENT
    assert transport_error(httpx.ReadTimeout("no answer"), "https://a", "x").failover == LOST
    assert transport_error(httpx.RemoteProtocolError("died"), "https://a", "x").failover == LOST
    body = {"code": "database_unavailable", "detail": "down"}
    for unavailable_code in (None, "kms_unreachable"):
        e503 = answer_error(503, body, "x", "https://a", unavailable_code=unavailable_code)
        e500 = answer_error(500, {}, "x", "https://a", unavailable_code=unavailable_code)
        assert e503 is not None and e503.failover == REFUSED
        assert e500 is not None and e500.failover == LOST
    conflict = answer_error(409, {"code": "key_exists"}, "x", "https://a")
    assert isinstance(conflict, Conflict) and conflict.failover is None


BASE = "[listen]\nport=0\nallow_plaintext=true\n[kms]\ncert_file='c'\nkey_file='k'\n"


def test_proxy_kms_url_takes_a_list() -> None:
    config = parse_config(BASE + "url=['https://a:8443', 'https://b:8443/']\n", source="t", base_dir="/x")
    assert config.kms is not None and config.kms.url == "https://a:8443,https://b:8443"
    config = parse_config(BASE + "url='https://a:8443,https://b:8443'\n", source="t", base_dir="/x")
    assert config.kms is not None and config.kms.url == "https://a:8443,https://b:8443"


@pytest.mark.parametrize(
    ("url", "expected"),
    [("[]", "1 to 16 strings"), ("['https://a', 3]", "1 to 16 strings"), ("['https://a', 'http://b']", "not an https"),
     ("'https://a,'", "empty key manager URL"), (str([f"https://h{i}" for i in range(17)]), "1 to 16 strings")],
)  # fmt: skip
def test_proxy_kms_url_list_mistakes(url: str, expected: str) -> None:
    with pytest.raises(ProxyConfigError) as info:
        parse_config(BASE + f"url={url}\n", source="t", base_dir="/x")
    assert expected in str(info.value)


VOLUME_ID = "00000000-0000-4000-8000-000000000001"


def test_a_volume_token_may_name_several_key_managers() -> None:
    ref = KmsRef("https://a:8443,https://b:8443", "acme", VOLUME_ID, "volumes", 1)
    assert ref.with_url("https://c:1,https://d:2/").url == "https://c:1,https://d:2"
    for bad in ("https://a:8443,", ",https://a", "https://a:8443,ftp://b", "https://a b"):
        with pytest.raises(VolumeRequestError):
            KmsRef(bad, "acme", VOLUME_ID, "volumes", 1)
