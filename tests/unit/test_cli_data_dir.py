"""The key manager a data directory describes (keysteward.cli.data_dir): good, missing and broken configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from keysteward.cli.data_dir import server_defaults

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("server", "url", "ca"),
    [
        ('listen_port = 9443\ntls_ca = "/d/ca.pem"\n', "https://127.0.0.1:9443", "/d/ca.pem"),
        ('listen_host = "0.0.0.0"\n', "https://127.0.0.1:8443", None),  # a wildcard: this machine
        ('listen_host = "::"\nlisten_port = 1\n', "https://127.0.0.1:1", None),
        ('listen_host = "fd00::5"\n', "https://[fd00::5]:8443", None),
        ('listen_host = "kms.internal"\ntls = false\n', "http://kms.internal:8443", None),
    ],
)
def test_a_servers_config_gives_its_url_and_ca(tmp_path: Path, server: str, url: str, ca: str | None) -> None:
    (tmp_path / "keysteward.toml").write_text("[server]\n" + server)
    assert server_defaults(str(tmp_path)) == (url, ca)


@pytest.mark.parametrize(
    "config", [None, "[server\nlisten_port = ", "server = 5\n", b"\xff\xfe[server]", "[server]\nlisten_port = 1\n"]
)
def test_no_or_broken_config_gives_nothing_or_the_defaults(tmp_path: Path, config: str | bytes | None) -> None:
    path = tmp_path / "keysteward.toml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    elif config is not None:
        path.write_text(config)
    found = server_defaults(str(tmp_path))
    assert found in ((None, None), ("https://127.0.0.1:1", None))


def test_the_environment_names_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "keysteward.toml").write_text("[server]\nlisten_port = 7\n")
    monkeypatch.delenv("KEYSTEWARD_DATA_DIR", raising=False)
    assert server_defaults() == (None, None)
    monkeypatch.setenv("KEYSTEWARD_DATA_DIR", str(tmp_path))
    assert server_defaults() == ("https://127.0.0.1:7", None)
