"""Issue 12: the OASIS KMIP 1.4 and 2.1 profile test cases over a real KMIP listener.

Each case file's requests are sent in order over mutual TLS (a new connection per file); each response is
compared with the expected one (tests/support/kmip_xml.py says what a server may choose). The mandatory
cases of the profiles served (Baseline 2.1, symmetric key lifecycle and foundry, opaque managed object store,
basic cryptographic server, RNG) must pass, except those in kmip_oasis_skips.toml, each with its reason.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from keysteward.formats import kmip_ttlv as t
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn
from tests.support.kmip_site import KmipSite, make_kmip_site
from tests.support.kmip_xml import Bindings, Unsupported, describe, expected_item, load_case, matches, to_item

pytestmark = pytest.mark.e2e
OASIS = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "kmip-oasis"
SKIPS = tomllib.loads((Path(__file__).parent / "kmip_oasis_skips.toml").read_text())
CASES = sorted(
    p for p in OASIS.glob("v*/mandatory/*.xml") if p.name.split("-M-")[0] in SKIPS["profiles"]
) if OASIS.exists() else []  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, secret_registry: SecretRegistry) -> KmipSite:
    from tests.fixtures.keysteward import ServerProcess as Process

    started: list[ServerProcess] = []

    def factory(data_dir: Path, env: dict[str, str] | None = None) -> ServerProcess:
        server = Process(data_dir, secret_registry, env)
        started.append(server)
        return server.start()

    made = make_kmip_site(tmp_path_factory.mktemp("oasis"), factory, secret_registry)
    yield made  # type: ignore[misc]
    for server in started:
        server.stop()


def run_case(site: KmipSite, path: Path) -> str | None:
    """None when every response matches; else what differed first."""
    cert = site.issue_once("oasis")
    bindings = Bindings()
    with KmipConn(site.port, site.tls(cert)) as conn:
        for n, (request, response) in enumerate(load_case(path)):
            message = to_item(bindings.substitute(request))
            got = t.decode(conn.send_raw(t.encode(message)))
            want, holes = expected_item(response, bindings)
            bound = matches(want, got, holes, (), bindings.ids)
            if bound is None:
                return f"message {n}: want\n{describe(want)}got\n{describe(got)}"
            bindings.ids = bound
    return None


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_oasis_case(site: KmipSite, path: Path) -> None:
    reason = SKIPS["skip"].get(path.stem)
    try:
        failure = run_case(site, path)
    except Unsupported as exc:
        failure = f"the runner cannot express it: {exc}"
    if reason is not None:
        assert failure is not None, f"{path.stem} passes now: take it off kmip_oasis_skips.toml"
        pytest.skip(reason)
    assert failure is None, failure


def test_the_cases_are_there() -> None:
    if not OASIS.exists():
        pytest.skip("../shared/testdata/kmip-oasis is not on this machine")
    assert len(CASES) == 85
