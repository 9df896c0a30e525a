"""A host's order fetch is a long poll: the order reaches the waiting host the moment it is made.

Against a real ``keysteward server start`` process over TLS, with a host certificate and no host agent (the
test plays the host): an empty fetch holds for its ``wait``, a placed order ends the wait at once and is
handed out once, to its host only; a ``wait`` out of range is refused.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.e2e.test_vm_hosts import Site, make_vm, site  # noqa: F401 - the site fixture

pytestmark = pytest.mark.e2e


def test_an_order_reaches_the_long_polling_host_at_once_and_only_once(site: Site) -> None:  # noqa: F811
    make_vm(site)
    idle, other = site.cert("host-idle"), site.cert("host-other")
    with site.server.http(cert=idle) as host, site.server.http(cert=other) as stranger:
        assert host.get("/host/orders", params={"wait": 0}).json() == []
        began = time.monotonic()
        assert host.get("/host/orders", params={"wait": 1}).json() == []
        assert time.monotonic() - began >= 0.9, "an empty fetch holds for its wait"
        for bad in ("-1", "61", "soon"):
            answer = host.get("/host/orders", params={"wait": bad})
            assert answer.status_code == 422 and "Traceback" not in answer.text, answer.text

        fetched: dict[str, Any] = {}

        def long_poll() -> None:
            answer = host.get("/host/orders", params={"wait": 20}, timeout=40)
            fetched.update(orders=answer.json(), at=time.monotonic())

        waiting = threading.Thread(target=long_poll)
        waiting.start()
        time.sleep(0.5)  # the fetch is held by now
        placed = time.monotonic()
        order = site.call("POST", "/vms/web/start", {"host": "host-idle"})
        waiting.join(30)
        assert [o["id"] for o in fetched["orders"]] == [order["id"]] and fetched["orders"][0]["kind"] == "start"
        assert fetched["at"] - placed < 2.0, "the order ended the 20 s wait at once"
        assert host.get("/host/orders", params={"wait": 0}).json() == []  # handed out once
        assert stranger.get("/host/orders", params={"wait": 0.5}).json() == []  # another host never sees it
