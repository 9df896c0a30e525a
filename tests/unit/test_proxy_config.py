"""The proxy's config: every mistake is one clear ``proxy_config`` error naming the key; good files parse whole.

Also the parts of the proxy that need no server: the metrics hook's arithmetic and the JSON log lines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.errors import KeystewardError
from keysteward.proxy.config import ProxyConfig, ProxyConfigError, check_files, is_loopback, load_config, parse_config
from keysteward.proxy.metrics import ProxyMetrics
from keysteward.proxy.service import JsonFormatter

pytestmark = pytest.mark.unit
ANY = "0.0.0.0"  # noqa: S104 - the address under test, never bound here
PLAIN = "[listen]\nallow_plaintext = true\n"

GOOD = """
log_level = "debug"
status_file = "run/proxy.json"

[listen]
address = "0.0.0.0"
port = 10809

[tls]
cert_file = "proxy.pem"
key_file = "proxy.key"
client_ca_file = "/etc/keysteward/tenant-ca.pem"

[metrics]
address = "127.0.0.1"
port = 9810

[kms]
url = "https://kms.example:8443"
ca_file = "kms-ca.pem"
cert_file = "host.pem"
key_file = "host.key"
timeout = 5
grace_seconds = 0

[[exports]]
name = "data1"
path = "data1.img"
kms = true
description = "tenant data"
clients = ["keysteward:acme/agent/vm-1", "vm-1.guests.example", "keysteward:acme/agent/vm-1"]

[[exports]]
name = "scratch"
path = "/srv/scratch.img"
read_only = true
passphrase_file = "scratch.pass"
clients = ["backup-host"]
"""


def parse(text: str) -> ProxyConfig:
    return parse_config(text, source="proxy.toml", base_dir="/etc/keysteward")


def refused(text: str) -> str:
    with pytest.raises(ProxyConfigError) as caught:
        parse(text)
    assert caught.value.code == "proxy_config" and caught.value.status == 400
    assert caught.value.message.startswith("proxy.toml: ")
    return caught.value.message


def test_a_full_config_parses_with_paths_from_the_config_directory() -> None:
    config = parse_config(GOOD, source="proxy.toml", base_dir="/etc/keysteward")
    assert (config.listen_address, config.listen_port, config.allow_plaintext) == (ANY, 10809, False)
    assert config.tls is not None and config.tls.cert_file == "/etc/keysteward/proxy.pem"
    assert config.tls.client_ca_file == "/etc/keysteward/tenant-ca.pem"
    assert (config.metrics_address, config.metrics_port) == ("127.0.0.1", 9810)
    assert config.kms is not None and config.kms.url == "https://kms.example:8443"
    assert (config.kms.cert_file, config.kms.timeout, config.kms.grace_seconds) == ("/etc/keysteward/host.pem", 5, 0)
    data1, scratch = config.exports
    assert (data1.name, data1.path, data1.kms, data1.passphrase_file, data1.read_only) == (
        "data1", "/etc/keysteward/data1.img", True, None, False,
    )  # fmt: skip
    assert (scratch.read_only, scratch.kms, scratch.passphrase_file) == (True, False, "/etc/keysteward/scratch.pass")
    assert data1.clients == ("keysteward:acme/agent/vm-1", "vm-1.guests.example")  # duplicates dropped
    assert scratch.clients == ("backup-host",)
    assert config.status_file == "/etc/keysteward/run/proxy.json" and config.log_level == "debug"
    assert [what for what, _ in config.files()] == [
        "tls.cert_file", "tls.key_file", "tls.client_ca_file", "kms.ca_file", "kms.cert_file", "kms.key_file",
        "exports[data1].path", "exports[scratch].path", "exports[scratch].passphrase_file",
    ]  # fmt: skip


def test_plaintext_on_loopback_needs_no_tls_and_no_exports() -> None:
    config = parse("[listen]\nallow_plaintext = true\n")
    assert config.tls is None and config.listen_address == "127.0.0.1" and config.exports == ()
    assert parse('[listen]\naddress = "::1"\nallow_plaintext = true\n').allow_plaintext


@pytest.mark.parametrize("address", [ANY, "10.0.0.5", "::", "proxy.internal", "192.168.1.2"])
def test_plaintext_on_a_non_loopback_address_is_refused(address: str) -> None:
    message = refused(f'[listen]\naddress = "{address}"\nallow_plaintext = true\n')
    assert "listen.allow_plaintext" in message and "loopback" in message and address in message


def test_tls_is_mandatory_without_allow_plaintext() -> None:
    assert "TLS is mandatory" in refused('[listen]\naddress = "127.0.0.1"\n')
    assert "tls.key_file: is required" in refused('[listen]\nport = 1\n[tls]\ncert_file = "a.pem"\n')


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[listen\n", "not valid TOML"),
        ("listen = [", "not valid TOML"),
        ("\x00", "not valid TOML"),
        ("colour = 1\n", "top level: unknown key 'colour'"),
        ("[listen]\nallow_plaintext = true\nbacklog = 5\n", "listen: unknown key 'backlog'"),
        ("[listen]\nallow_plaintext = true\n[tls]\ncert_file='a'\nkey_file='b'\nciphers='x'\n", "tls: unknown key"),
        ("[listen]\nallow_plaintext = true\n[metrics]\nport = 1\npath = '/m'\n", "metrics: unknown key 'path'"),
        (
            "[listen]\nallow_plaintext = true\n[[exports]]\nname='a'\npath='/a'\nkms=true\ncache=1\n",
            "exports[0]: unknown key 'cache'",
        ),
        (
            "[listen]\nallow_plaintext = true\n[kms]\ncert_file='c'\nkey_file='k'\nproxy='x'\n",
            "kms: unknown key 'proxy'",
        ),
        ("listen = 5\n", "listen: must be a table"),
        ("[listen]\nport = 70000\nallow_plaintext = true\n", "listen.port: must be a port number"),
        ("[listen]\nport = true\nallow_plaintext = true\n", "listen.port: must be a port number"),
        ("[listen]\nport = '10809'\nallow_plaintext = true\n", "listen.port: must be a port number"),
        ("[listen]\nallow_plaintext = 'yes'\n", "listen.allow_plaintext: must be true or false"),
        ("[listen]\naddress = 'bad host!'\nallow_plaintext = true\n", "is not an IP address or host name"),
        ("[listen]\nallow_plaintext = true\n[metrics]\naddress = '127.0.0.1'\n", "metrics.port: is required"),
        ("log_level = 'loud'\n[listen]\nallow_plaintext = true\n", "log_level: must be one of"),
        ("[listen]\nallow_plaintext = true\nexports = 3\n", "listen: unknown key 'exports'"),
        ("exports = 3\n[listen]\nallow_plaintext = true\n", "exports: must be an array of tables"),
    ],
)
def test_each_mistake_is_one_clear_error(text: str, expected: str) -> None:
    assert expected in refused(text)


@pytest.mark.parametrize(
    ("exports", "expected"),
    [
        ("[[exports]]\npath='/a'\nkms=true\n", "exports[0].name: is required"),
        ("[[exports]]\nname='../x'\npath='/a'\nkms=true\n", "exports[0].name: '../x' must be"),
        ("[[exports]]\nname='a'\nkms=true\n", "exports[a].path: is required"),
        ("[[exports]]\nname='a'\npath='/a'\n", "exports[a]: needs exactly one key source"),
        ("[[exports]]\nname='a'\npath='/a'\nkms=true\npassphrase_file='p'\n", "needs exactly one key source"),
        ("[[exports]]\nname='a'\npath='/a'\nkms=true\n", "kms: an export has kms = true but there is no [kms]"),
        ("[[exports]]\nname='a'\npath='/a'\npassphrase_file='p'\n" * 2, "exports[1].name: export 'a' is configured"),
        ("[[exports]]\nname='a'\npath='/a'\npassphrase_file='p'\nread_only=1\n", "exports[a].read_only: must be"),
        ("[[exports]]\nname='a'\npath=7\npassphrase_file='p'\n", "exports[a].path: must be a string"),
        ("[kms]\nurl='http://kms'\ncert_file='c'\nkey_file='k'\n", "kms.url: 'http://kms' is not an https:// URL"),
        ("[kms]\ncert_file='c'\n", "kms.key_file: is required"),
        ("[kms]\ncert_file='c'\nkey_file='k'\ntimeout=0\n", "kms.timeout: must be a number"),
        ("[kms]\ncert_file='c'\nkey_file='k'\ngrace_seconds=-1\n", "kms.grace_seconds: must be a number"),
    ],
)
def test_export_and_kms_mistakes(exports: str, expected: str) -> None:
    assert expected in refused(PLAIN + exports)


def _files(tmp_path: Path) -> str:
    for name in ("proxy.pem", "proxy.key", "ca.pem", "vol.img", "vol.pass"):
        (tmp_path / name).write_bytes(b"x" * 16)
    return (
        "[listen]\nport = 0\n[tls]\ncert_file = 'proxy.pem'\nkey_file = 'proxy.key'\nclient_ca_file = 'ca.pem'\n"
        "[[exports]]\nname = 'vol'\npath = 'vol.img'\npassphrase_file = 'vol.pass'\nclients = ['vm-1']\n"
    )


def test_load_config_checks_every_file_it_names(tmp_path: Path) -> None:
    config_file = tmp_path / "proxy.toml"
    config_file.write_text(_files(tmp_path))
    config = load_config(str(config_file))
    assert config.exports[0].path == str(tmp_path / "vol.img")
    for name, expected in (("proxy.key", "tls.key_file: cannot use"), ("ca.pem", "tls.client_ca_file: cannot use"),
                           ("vol.img", "exports[vol].path: cannot use"),
                           ("vol.pass", "exports[vol].passphrase_file: cannot use")):  # fmt: skip
        moved = tmp_path / f"{name}.away"
        (tmp_path / name).rename(moved)
        with pytest.raises(ProxyConfigError) as caught:
            load_config(str(config_file))
        assert expected in caught.value.message and str(tmp_path / name) in caught.value.message
        assert "No such file" in caught.value.message
        moved.rename(tmp_path / name)
    (tmp_path / "vol.img").write_bytes(b"")
    with pytest.raises(ProxyConfigError, match=r"exports\[vol\].path: .* is empty"):
        load_config(str(config_file))
    (tmp_path / "vol.img").unlink()
    (tmp_path / "vol.img").mkdir()
    with pytest.raises(ProxyConfigError, match="is a directory"):
        load_config(str(config_file))
    assert load_config(str(config_file), check=False).exports[0].name == "vol"  # parse only: no look at the files


def test_unreadable_missing_oversized_and_non_utf8_config_files(tmp_path: Path) -> None:
    with pytest.raises(ProxyConfigError, match="cannot read the proxy config"):
        load_config(str(tmp_path / "nope.toml"))
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    with pytest.raises(ProxyConfigError, match="larger than"):
        load_config(str(big))
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ProxyConfigError, match="not UTF-8"):
        load_config(str(latin))


def test_check_files_refuses_a_special_file(tmp_path: Path) -> None:
    config = parse_config(
        PLAIN + "[[exports]]\nname='tty'\npath='/dev/null'\npassphrase_file='/dev/null'\n", base_dir=str(tmp_path)
    )
    with pytest.raises(ProxyConfigError, match="is not a file or a block device"):
        check_files(config)


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback(ANY) and not is_loopback("::") and not is_loopback("localhost.evil.example")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_fuzz_any_text_parses_or_is_one_proxy_config_error(text: str) -> None:
    try:
        parse(text)
    except ProxyConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["address", "port", "allow_plaintext", "x"]),
        st.one_of(st.integers(-5, 70000), st.booleans(), st.text(max_size=20), st.none()),
    )
)
def test_fuzz_listen_tables(table: dict[str, object]) -> None:
    lines = [f"{k} = {json.dumps(v)}" for k, v in table.items() if v is not None]
    try:
        config = parse("[listen]\n" + "\n".join(lines) + "\n")
    except ProxyConfigError:
        return
    # whatever parsed is consistent: plaintext only on loopback, a port in range
    assert 0 <= config.listen_port <= 65535
    assert not config.allow_plaintext or is_loopback(config.listen_address)


# -- metrics and logs -----------------------------------------------------------------------------


def _sample(metrics: ProxyMetrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


def test_metrics_count_bytes_ops_and_latency_per_export() -> None:
    metrics = ProxyMetrics()
    metrics.opened("a")
    metrics.opened("b")
    metrics.observe("a", "read", 4096, 0.002)
    metrics.observe("a", "read", 512, 0.001)
    metrics.observe("a", "write", 1000, 0.003)
    metrics.observe("a", "write_zeroes", 8192, 0.001)
    metrics.observe("a", "flush", 0, 0.01)
    metrics.observe("b", "READ", 10, 0.0)
    assert _sample(metrics, "keysteward_proxy_read_bytes_total", export="a") == 4608
    assert _sample(metrics, "keysteward_proxy_written_bytes_total", export="a") == 9192
    assert _sample(metrics, "keysteward_proxy_read_bytes_total", export="b") == 10
    assert _sample(metrics, "keysteward_proxy_requests_total", export="a", command="read") == 2
    assert _sample(metrics, "keysteward_proxy_requests_total", export="a", command="flush") == 1
    assert _sample(metrics, "keysteward_proxy_request_seconds_count", export="a", command="write") == 1
    assert _sample(metrics, "keysteward_proxy_request_seconds_sum", export="a", command="read") == pytest.approx(0.003)
    assert _sample(metrics, "keysteward_proxy_export_open", export="a") == 1
    metrics.closed("a", "revoked")
    assert _sample(metrics, "keysteward_proxy_export_open", export="a") == 0
    assert _sample(metrics, "keysteward_proxy_export_closes_total", export="a", reason="revoked") == 1
    text = metrics.render().decode()
    assert 'keysteward_proxy_read_bytes_total{export="a"} 4608.0' in text
    metrics.forget("a")
    text = metrics.render().decode()
    assert 'export="a"' not in text and 'export="b"' in text
    metrics.observe("a", "read", 1, 0.0)  # an export that comes back starts from zero
    assert _sample(metrics, "keysteward_proxy_read_bytes_total", export="a") == 1
    assert _sample(ProxyMetrics(), "keysteward_proxy_read_bytes_total", export="a") is None  # a registry per proxy


def _format(message: str, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("keysteward.proxy", logging.WARNING, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return dict(json.loads(JsonFormatter().format(record)))


def test_json_log_lines() -> None:
    agent_line = _format('event=locked volume=data1 reason=revoked error="no route to host" retry_in=1.5')
    assert agent_line["event"] == "locked" and agent_line["volume"] == "data1" and agent_line["reason"] == "revoked"
    assert agent_line["error"] == "no route to host" and agent_line["level"] == "warning"
    own = _format("export_closed", fields={"event": "export_closed", "export": "a", "reason": "revoked"})
    assert own["event"] == "export_closed" and own["export"] == "a" and "msg" not in own
    assert _format("plain words")["msg"] == "plain words"
    try:
        raise KeystewardError("bad thing", code="x")
    except KeystewardError as exc:
        with_exc = _format("oops", exc_info=(type(exc), exc, exc.__traceback__))
    assert with_exc["error"] == "KeystewardError: bad thing" and "Traceback" not in json.dumps(with_exc)


TLS = "[listen]\n[tls]\ncert_file = 'p.pem'\nkey_file = 'p.key'\nclient_ca_file = 'ca.pem'\n"
EXPORT = "[[exports]]\nname = 'vol'\npath = '/v.img'\npassphrase_file = '/v.pass'\n"


def test_tls_needs_a_client_ca_and_every_export_names_its_clients() -> None:
    assert "tls.client_ca_file: is required" in refused("[listen]\n[tls]\ncert_file = 'a'\nkey_file = 'b'\n")
    assert "exports[vol].clients: is required with [tls]" in refused(TLS + EXPORT)
    assert "exports[vol].clients: needs [tls]" in refused(PLAIN + EXPORT + "clients = ['vm-1']\n")
    assert parse(PLAIN + EXPORT).exports[0].clients == ()  # plaintext loopback: no identities at all


@pytest.mark.parametrize(
    ("clients", "expected"),
    [
        ("[]", "must be a non-empty array of strings"),
        ("'vm-1'", "must be a non-empty array of strings"),
        ("[1]", "clients[0]: must be a string"),
        ("['']", "clients[0]: must be a string"),
        ("['vm-1', ['x']]", "clients[1]: must be a string"),
        (f"['{'a' * 1025}']", "clients[0]: must be a string of 1-1024"),
        ('["vm-1\\u0007"]', "control characters"),
        ("[' vm-1']", "surrounding spaces"),
        ("['*']", "not a wildcard"),
        ("[" + ",".join(f"'c{i}'" for i in range(257)) + "]", "more than 256 clients"),
        ("{a = 1}", "must be a non-empty array of strings"),
    ],
)
def test_bad_client_lists_are_refused(clients: str, expected: str) -> None:
    assert expected in refused(TLS + EXPORT + f"clients = {clients}\n")


@given(st.lists(st.text(max_size=40), max_size=6))
@settings(max_examples=200, deadline=None)
def test_fuzz_client_lists_parse_or_are_one_proxy_config_error(clients: list[str]) -> None:
    try:
        config = parse(TLS + EXPORT + f"clients = {json.dumps(clients)}\n")
    except ProxyConfigError:
        return
    assert config.exports[0].clients and all(c and c == c.strip() for c in config.exports[0].clients)
