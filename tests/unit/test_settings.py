"""Configuration (keysteward.settings): TOML file, KEYSTEWARD_* overrides, clear errors for bad input."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from keysteward import settings
from keysteward.errors import BadRequest
from keysteward.settings import RewrapSettings, SealSettings, ServerSettings, Settings, StorageSettings

pytestmark = pytest.mark.unit

BOUNDED = hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(data_dir: Path, text: str | bytes) -> None:
    path = data_dir / settings.CONFIG_NAME
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def load_error(data_dir: Path, env: dict[str, str] | None = None) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        settings.load(data_dir, env={} if env is None else env)
    assert info.value.status == 400
    return info.value


# --- defaults --------------------------------------------------------------------------------


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = settings.load(tmp_path, env={})
    assert s == Settings(data_dir=tmp_path)
    assert s.server.listen_host == "127.0.0.1"
    assert s.server.listen_port == 8443
    assert s.server.tls is True
    assert s.server.max_body_bytes == 65536
    assert s.storage.sqlite_synchronous == "FULL"
    assert s.rewrap.batch_size == 200
    assert s.seal.pkcs11_module == "/usr/lib/softhsm/libsofthsm2.so"
    assert s.database_url == f"sqlite:///{tmp_path / 'keysteward.db'}"
    assert s.tls_dir == tmp_path / "tls"


def test_path_helper(tmp_path: Path) -> None:
    s = settings.load(tmp_path, env={})
    assert s.path("", "server.pem") == tmp_path / "server.pem"
    assert s.path("/etc/ks/server.pem", "server.pem") == Path("/etc/ks/server.pem")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    write(tmp_path, "")
    assert settings.load(tmp_path, env={}) == Settings(data_dir=tmp_path)


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = settings.load(tmp_path, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.listen_port = 1  # type: ignore[misc]


def test_process_environment_is_used_when_env_is_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTEWARD_SERVER_WORKERS", "3")
    assert settings.load(tmp_path).server.workers == 3


# --- TOML values -----------------------------------------------------------------------------


def test_toml_values(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
[server]
listen_host = "192.0.2.10"
listen_port = 9000
database_url = "postgresql+psycopg://ks@db/ks"
tls = false
max_body_bytes = 1024

[seal]
pkcs11_token_label = "prod"

[storage]
pool_size = 5

[rewrap]
batch_size = 10
interval = 0.5
""",
    )
    s = settings.load(tmp_path, env={})
    assert s.server.listen_host == "192.0.2.10"
    assert s.server.listen_port == 9000
    assert s.server.tls is False
    assert s.server.max_body_bytes == 1024
    assert s.database_url == "postgresql+psycopg://ks@db/ks"
    assert s.seal.pkcs11_token_label == "prod"
    assert s.storage.pool_size == 5
    assert s.rewrap.batch_size == 10
    assert s.rewrap.interval == 0.5
    # untouched values keep their defaults
    assert s.server.workers == 1
    assert s.rewrap.lease_seconds == 30.0


def test_int_in_a_float_setting(tmp_path: Path) -> None:
    write(tmp_path, "[rewrap]\ninterval = 2\n")
    value = settings.load(tmp_path, env={}).rewrap.interval
    assert value == 2.0
    assert isinstance(value, float)


# --- environment overrides -------------------------------------------------------------------


def test_env_overrides_win_over_toml(tmp_path: Path) -> None:
    write(tmp_path, '[server]\nlisten_port = 9000\nlisten_host = "192.0.2.10"\ntls = true\n')
    env = {
        "KEYSTEWARD_SERVER_LISTEN_PORT": "9443",
        "KEYSTEWARD_SERVER_TLS": "false",
        "KEYSTEWARD_REWRAP_INTERVAL": "1.5",
        "KEYSTEWARD_SEAL_DEV_KEY_FILE": "/tmp/dev.key",
        "KEYSTEWARD_STORAGE_SQLITE_SYNCHRONOUS": "NORMAL",
    }
    s = settings.load(tmp_path, env=env)
    assert s.server.listen_port == 9443
    assert s.server.tls is False
    assert s.server.listen_host == "192.0.2.10"  # not overridden: the file wins over the default
    assert s.rewrap.interval == 1.5
    assert s.seal.dev_key_file == "/tmp/dev.key"
    assert s.storage.sqlite_synchronous == "NORMAL"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("OFF", False),
    ],
)
def test_env_bools(tmp_path: Path, text: str, expected: bool) -> None:
    assert settings.load(tmp_path, env={"KEYSTEWARD_SERVER_TLS": text}).server.tls is expected


@pytest.mark.parametrize("text", ["", "maybe", "2", "tru", "nein", "-1"])
def test_env_bad_bool(tmp_path: Path, text: str) -> None:
    err = load_error(tmp_path, {"KEYSTEWARD_SERVER_TLS": text})
    assert err.code == "bad_setting"
    assert "server.tls" in err.message


def test_unrelated_env_is_ignored(tmp_path: Path) -> None:
    env = {"KEYSTEWARD_SERVER_NOPE": "x", "KEYSTEWARD_OTHER_THING": "y", "PATH": "/bin"}
    assert settings.load(tmp_path, env=env) == Settings(data_dir=tmp_path)


def test_env_override_of_a_bad_file_value_still_fails_on_the_file(tmp_path: Path) -> None:
    write(tmp_path, "[server]\nbogus = 1\n")
    assert load_error(tmp_path, {"KEYSTEWARD_SERVER_LISTEN_PORT": "1"}).code == "bad_config"


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[server",
        "listen_port = ",
        "[server]\nlisten_port = 1\nlisten_port = 2\n",
        '[server]\nlisten_host = "unterminated\n',
        "= 1",
        "[server]\n[server]\n",
    ],
)
def test_bad_toml(tmp_path: Path, text: str) -> None:
    write(tmp_path, text)
    err = load_error(tmp_path)
    assert err.code == "bad_config"
    assert "not valid TOML" in err.message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    write(tmp_path, b'[server]\nlisten_host = "\xff\xfe"\n')
    assert load_error(tmp_path).code == "bad_config"


@pytest.mark.parametrize(
    "text",
    [
        "[server]\nlisten_prot = 9000\n",
        "[seal]\npin = '1234'\n",
        "[rewrap]\nbatch = 1\n",
        "[storage]\nsynchronous = 'OFF'\n",
    ],
)
def test_unknown_keys(tmp_path: Path, text: str) -> None:
    write(tmp_path, text)
    err = load_error(tmp_path)
    assert err.code == "bad_config"
    assert "unknown setting" in err.message


@pytest.mark.parametrize("text", ["server = 1\n", 'server = "x"\n', "server = [1, 2]\n"])
def test_section_that_is_not_a_table(tmp_path: Path, text: str) -> None:
    write(tmp_path, text)
    assert load_error(tmp_path).code == "bad_config"


@pytest.mark.parametrize("text", ["[srever]\nlisten_port = 9000\n", "listen_port = 9000\n"])
def test_unknown_section_or_top_level_key(tmp_path: Path, text: str) -> None:
    write(tmp_path, text)
    assert load_error(tmp_path).code == "bad_config"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[server]\nlisten_port = "abc"\n', "server.listen_port"),
        ('[server]\nworkers = "1.5"\n', "server.workers"),
        ("[server]\nmax_body_bytes = []\n", "server.max_body_bytes"),
        ('[rewrap]\ninterval = "soon"\n', "rewrap.interval"),
        ('[server]\ntls = "maybe"\n', "server.tls"),
    ],
)
def test_bad_value_in_toml(tmp_path: Path, text: str, field: str) -> None:
    write(tmp_path, text)
    err = load_error(tmp_path)
    assert err.code == "bad_setting"
    assert field in err.message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KEYSTEWARD_SERVER_LISTEN_PORT", "abc"),
        ("KEYSTEWARD_SERVER_LISTEN_PORT", ""),
        ("KEYSTEWARD_SERVER_LISTEN_PORT", "8443.0"),
        ("KEYSTEWARD_STORAGE_POOL_SIZE", "0x10"),
        ("KEYSTEWARD_REWRAP_LEASE_SECONDS", "thirty"),
    ],
)
def test_bad_int_or_float_in_env(tmp_path: Path, name: str, value: str) -> None:
    err = load_error(tmp_path, {name: value})
    assert err.code == "bad_setting"
    section, field = name.removeprefix("KEYSTEWARD_").lower().split("_", 1)
    assert f"{section}.{field}" in err.message


@pytest.mark.parametrize("text", ["[server]\nlisten_port = 8443.7\n", "[server]\nworkers = true\n"])
def test_float_or_bool_in_an_int_setting(tmp_path: Path, text: str) -> None:
    write(tmp_path, text)
    assert load_error(tmp_path).code == "bad_setting"


def test_error_names_the_file(tmp_path: Path) -> None:
    write(tmp_path, "[server")
    assert str(tmp_path / settings.CONFIG_NAME) in load_error(tmp_path).message


# --- render ----------------------------------------------------------------------------------


def test_render_defaults_loads_back(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    text = settings.render(s)
    assert tomllib.loads(text)["server"]["listen_port"] == 8443
    write(tmp_path, text)
    assert settings.load(tmp_path, env={}) == s


def test_render_changed_values_loads_back(tmp_path: Path) -> None:
    s = Settings(
        data_dir=tmp_path,
        server=ServerSettings(
            listen_host="::1",
            listen_port=1,
            database_url='postgresql://u:p"w\\d@h/db',
            tls=False,
            tls_cert="C:\\certs\\server.pem",
            log_level="debug",
        ),
        seal=SealSettings(dev_key_file="/var/lib/ks/dev key", pkcs11_pin_file="pin'file"),
        storage=StorageSettings(sqlite_synchronous="NORMAL", pool_size=0),
        rewrap=RewrapSettings(batch_size=1, interval=1e-05, lease_seconds=1e20, poll_seconds=0.25),
    )
    write(tmp_path, settings.render(s))
    assert settings.load(tmp_path, env={}) == s


_toml_safe_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.just("\t"),
    max_size=40,
)
_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@BOUNDED
@given(
    server=st.builds(
        ServerSettings,
        listen_host=_toml_safe_text,
        listen_port=st.integers(0, 65535),
        database_url=_toml_safe_text,
        tls=st.booleans(),
        tls_cert=_toml_safe_text,
        max_body_bytes=st.integers(-(2**63), 2**63 - 1),
        workers=st.integers(0, 64),
        log_level=_toml_safe_text,
    ),
    seal=st.builds(SealSettings, dev_key_file=_toml_safe_text, pkcs11_pin_file=_toml_safe_text),
    storage=st.builds(StorageSettings, sqlite_synchronous=_toml_safe_text, pool_size=st.integers(0, 1000)),
    rewrap=st.builds(
        RewrapSettings,
        batch_size=st.integers(1, 10_000),
        interval=_finite,
        lease_seconds=_finite,
        poll_seconds=st.floats(allow_nan=False),
    ),
)
def test_render_round_trip(
    tmp_path: Path,
    server: ServerSettings,
    seal: SealSettings,
    storage: StorageSettings,
    rewrap: RewrapSettings,
) -> None:
    s = Settings(data_dir=tmp_path, server=server, seal=seal, storage=storage, rewrap=rewrap)
    write(tmp_path, settings.render(s))
    assert settings.load(tmp_path, env={}) == s


@pytest.mark.parametrize("value", ["line1\nline2", "a\x01b", "bell\x07", "cr\r"])
def test_render_escapes_control_characters(tmp_path: Path, value: str) -> None:
    s = settings.load(tmp_path, env={"KEYSTEWARD_SERVER_LOG_LEVEL": value})
    assert s.server.log_level == value
    write(tmp_path, settings.render(s))
    assert settings.load(tmp_path, env={}) == s


# --- [audit] checkpoint sinks ----------------------------------------------------------------------


def test_audit_checkpoint_settings_from_file_and_env(tmp_path: Path) -> None:
    write(
        tmp_path,
        '[audit]\ncheckpoint_sinks = ["file:/var/log/ks/cp.jsonl", "syslog"]\ncheckpoint_interval = 30\n',
    )
    s = settings.load(tmp_path, env={})
    assert s.audit.checkpoint_sinks == ("file:/var/log/ks/cp.jsonl", "syslog")
    assert s.audit.checkpoint_interval == 30.0
    env = settings.load(tmp_path, env={"KEYSTEWARD_AUDIT_CHECKPOINT_SINKS": "file:a.jsonl, https://siem/hook"})
    assert env.audit.checkpoint_sinks == ("file:a.jsonl", "https://siem/hook")
    as_json = settings.load(tmp_path, env={"KEYSTEWARD_AUDIT_CHECKPOINT_SINKS": '["https://h/x?a=1,2"]'})
    assert as_json.audit.checkpoint_sinks == ("https://h/x?a=1,2",)
    assert settings.load(tmp_path, env={"KEYSTEWARD_AUDIT_CHECKPOINT_SINKS": ""}).audit.checkpoint_sinks == ()
    write(tmp_path, settings.render(s))
    assert settings.load(tmp_path, env={}) == s
    assert Settings(data_dir=tmp_path).audit.checkpoint_sinks == ()


@pytest.mark.parametrize(
    ("toml", "env"),
    [
        ("[audit]\ncheckpoint_sinks = [1]\n", {}),
        ('[audit]\ncheckpoint_sinks = {a = "b"}\n', {}),
        ("", {"KEYSTEWARD_AUDIT_CHECKPOINT_SINKS": "[not json"}),
        ("", {"KEYSTEWARD_AUDIT_CHECKPOINT_SINKS": '["a", 2]'}),
        ("", {"KEYSTEWARD_AUDIT_CHECKPOINT_SINKS": ",".join(["syslog"] * 65)}),
        ("[audit]\ncheckpoint_interval = true\n", {}),
    ],
)
def test_bad_audit_checkpoint_settings(tmp_path: Path, toml: str, env: dict[str, str]) -> None:
    write(tmp_path, toml)
    assert load_error(tmp_path, env).code == "bad_setting"


# --- [release] approver cooling-off ----------------------------------------------------------------


def test_approver_cooling_off_default_file_and_env(tmp_path: Path) -> None:
    assert settings.load(tmp_path, env={}).release.approver_cooling_off_seconds == 86400.0
    write(tmp_path, "[release]\napprover_cooling_off_seconds = 3600\n")
    assert settings.load(tmp_path, env={}).release.approver_cooling_off_seconds == 3600.0
    env = {"KEYSTEWARD_RELEASE_APPROVER_COOLING_OFF_SECONDS": "0"}
    assert settings.load(tmp_path, env=env).release.approver_cooling_off_seconds == 0.0


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "a day", "", "true"])
def test_bad_approver_cooling_off(tmp_path: Path, value: str) -> None:
    env = {"KEYSTEWARD_RELEASE_APPROVER_COOLING_OFF_SECONDS": value}
    assert load_error(tmp_path, env).code == "bad_setting"


@pytest.mark.parametrize("value", ["-0.5", "nan", "-inf", "true", "[]"])
def test_bad_approver_cooling_off_in_file(tmp_path: Path, value: str) -> None:
    write(tmp_path, f"[release]\napprover_cooling_off_seconds = {value}\n")
    assert load_error(tmp_path).code == "bad_setting"
