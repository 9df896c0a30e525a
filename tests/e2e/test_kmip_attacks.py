"""Issue 12, bad input and faults, against a real ``keysteward server start`` KMIP listener.

- another tenant's identifier: Item Not Found, audited in the asker's chain, the object untouched;
- a revoked hypervisor certificate: Permission Denied within the revocation check's second, nothing done;
- a certificate of role agent (not hypervisor): Permission Denied for every batch item, nothing created;
- the tenant's Cedar policy: keys tagged x-Component = "Virtual Machine" go only to esx-1;
- a Destroy of an Active key: Permission Denied, audited, the key still served;
- garbage, a header announcing a huge message, a bad body, a slow client: only that connection closes
  (or answers Invalid Message), while another client's open connection goes on working;
- an unsupported operation: Operation Not Supported, the connection stays up;
- attributes of the wrong type, a key size not served, a server attribute set by a client: Invalid Field or
  Permission Denied, nothing created or changed; a Locate asking for millions answers the server's cap.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keysteward.formats import kmip_ttlv as t
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn, aes_256_template, attribute, batch_item, text, uid
from tests.support.kmip_site import KmipSite, make_kmip_site

pytestmark = pytest.mark.e2e
REVOCATION_SECONDS = 1.0 + 2.0
"""The servers' one-second revocation cache, and a margin for a loaded machine."""


@pytest.fixture
def site(tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry) -> KmipSite:
    return make_kmip_site(
        tmp_path,
        server_factory,
        secret_registry,
        env={"KEYSTEWARD_KMIP_READ_TIMEOUT": "1", "KEYSTEWARD_KMIP_MAX_LOCATE_ITEMS": "3"},
    )


def _create(c: KmipConn, component: str = "") -> str:
    created = c.one("Create", *aes_256_template())
    assert created.ok, created.reason
    if component:
        assert c.one("AddAttribute", uid(created.uid()), attribute("x-Component", text(component))).ok
    return created.uid()


def _audit(site: KmipSite, token: str, actor: str) -> list[dict]:
    return list(site.server.cli_json("audit", "list", "--actor", actor, token=token))


def test_another_tenants_identifier_is_not_found(site: KmipSite) -> None:
    acme = site.tls(site.issue("esx-1")[:2])
    with KmipConn(site.port, acme) as c:
        key = _create(c)
    with site.server.http(site.server_root_token()) as h:
        globex_admin = str(h.post("/tenants", json={"name": "globex"}).json()["admin_token"]["token"])
    with site.server.http(globex_admin) as h:
        assert h.post("/ca/init").status_code == 201
    made = site.server.cli_json("ca", "issue", "esx-9", "--role", "hypervisor", "--out-dir",
                                str(site.tmp / "globex"), token=globex_admin)  # fmt: skip
    globex = site.tls((Path(made["cert"]), Path(made["key"])))
    with KmipConn(site.port, globex) as c:
        for operation in ("Get", "GetAttributes", "Activate", "Destroy"):
            assert c.one(operation, uid(key)).reason == "ItemNotFound", operation
        assert c.one("AddAttribute", uid(key), attribute("x-Name", text("stolen"))).reason == "ItemNotFound"
        assert c.request(batch_item("Locate"))[0].payload.all("UniqueIdentifier") == []  # type: ignore[union-attr]
    records = _audit(site, globex_admin, "cert:globex/hypervisor/esx-9")
    assert {r["reason"] for r in records if r["action"] == "kmip.get"} == {"kmip_not_found"}
    with KmipConn(site.port, acme) as c:
        assert c.one("Get", uid(key)).ok
        assert "x-Name" not in c.one("GetAttributes", uid(key)).attributes()


def test_a_revoked_certificate_is_refused(site: KmipSite) -> None:
    cert, key, serial = site.issue("esx-1")
    ctx = site.tls((cert, key))
    with KmipConn(site.port, ctx) as c:
        kept = _create(c)
        assert c.one("Get", uid(kept)).ok
        site.server.cli("ca", "revoke", "--yes", "hypervisor:esx-1", token=site.admin)
        deadline = time.monotonic() + REVOCATION_SECONDS
        while c.one("Get", uid(kept)).ok:  # the open connection is refused too, message by message
            assert time.monotonic() < deadline, "a revoked certificate still fetches keys"
            time.sleep(0.05)
    with KmipConn(site.port, ctx) as c:
        assert c.one("Get", uid(kept)).reason == "PermissionDenied"
        assert c.one("Create", *aes_256_template()).reason == "PermissionDenied"
    assert serial


def test_a_certificate_without_the_hypervisor_role_is_refused(site: KmipSite) -> None:
    agent = site.tls(site.issue("app-1", role="agent")[:2])
    with KmipConn(site.port, agent) as c:
        results = c.request(batch_item("Create", *aes_256_template(), batch_id=b"a"), batch_item("Locate"))
        assert [r.reason for r in results] == ["PermissionDenied"]  # the batch stops at the first failure
        assert results[0].batch_id == b"a"
    hypervisor = site.tls(site.issue("esx-1")[:2])
    with KmipConn(site.port, hypervisor) as c:
        located = c.one("Locate")
        assert located.ok and located.payload is not None and located.payload.all("UniqueIdentifier") == []


def test_the_tenant_policy_decides_who_gets_vm_keys(site: KmipSite) -> None:
    policy = (Path(__file__).parents[2] / "docs/policies/kmip-vm-keys.cedar").read_text()
    with site.server.http(site.admin) as h:
        assert h.put("/policy", json={"sources": {"kmip-vm-keys.cedar": policy}}).status_code == 200
    esx1, esx2 = site.tls(site.issue("esx-1")[:2]), site.tls(site.issue("esx-2")[:2])
    with KmipConn(site.port, esx2) as c:
        vm_key, other = _create(c, "Virtual Machine"), _create(c, "vSAN")
        assert c.one("Get", uid(vm_key)).reason == "PermissionDenied"
        assert c.one("Get", uid(other)).ok
    with KmipConn(site.port, esx1) as c:
        assert c.one("Get", uid(vm_key)).ok
    denied = [r for r in _audit(site, site.admin, "cert:acme/hypervisor/esx-2") if r["outcome"] == "denied"]
    assert denied[0]["reason"] == "forbidden_by_policy" and denied[0]["details"]["x-Component"] == "Virtual Machine"


def test_destroy_of_an_active_key_is_refused(site: KmipSite) -> None:
    ctx = site.tls(site.issue("esx-1")[:2])
    with KmipConn(site.port, ctx) as c:
        key = _create(c)
        assert c.one("Activate", uid(key)).ok
        assert c.one("Destroy", uid(key)).reason == "PermissionDenied"
        assert c.one("Get", uid(key)).ok
    with KmipConn(site.port, ctx, version=(1, 4)) as c:
        unsupported = c.one("Certify", uid(key), batch_id=b"z")
        assert unsupported.reason == "OperationNotSupported" and unsupported.batch_id == b"z"
        assert c.one("Get", uid(key)).ok  # the connection is still up
    denied = [r for r in _audit(site, site.admin, "cert:acme/hypervisor/esx-1") if r["action"] == "kmip.destroy"]
    assert denied[0]["outcome"] == "denied" and denied[0]["reason"] == "kmip_wrong_state"


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except (ConnectionError, OSError):
        return True


def test_bad_messages_close_only_their_connection(site: KmipSite) -> None:
    ctx = site.tls(site.issue("esx-1")[:2])
    with KmipConn(site.port, ctx) as bystander:
        key = _create(bystander)
        with KmipConn(site.port, ctx) as garbage:
            garbage.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _closed(garbage.sock)
        with KmipConn(site.port, ctx) as huge:
            huge.sock.sendall(bytes.fromhex("42007801") + (1 << 30).to_bytes(4, "big"))  # 1 GiB announced
            assert _closed(huge.sock)  # refused from the header, the body never read
        with KmipConn(site.port, ctx) as bad_body:
            body = t.encode(t.struct_("RequestMessage", t.integer("BatchCount", 1)))
            damaged = body[:-1] + b"\x01"  # non-zero padding
            answer = t.decode(bad_body.send_raw(damaged))
            [item] = answer.all("BatchItem")
            assert item.first("ResultReason").value == 4  # type: ignore[union-attr]  # Invalid Message
            assert _closed(bad_body.sock)
        with KmipConn(site.port, ctx) as unknown:
            message = t.struct_("RequestMessage", Item_unknown())
            answer = t.decode(unknown.send_raw(t.encode(message)))
            assert answer.all("BatchItem")[0].first("ResultReason").value == 4  # type: ignore[union-attr]
            assert unknown.one("Get", uid(key)).ok  # a well-framed message keeps its connection
        with KmipConn(site.port, ctx) as slow:
            slow.sock.sendall(bytes.fromhex("420078"))  # part of a header, then nothing
            started = time.monotonic()
            assert _closed(slow.sock) and time.monotonic() - started < 4
        with KmipConn(site.port, ctx, version=(3, 0)) as future:
            assert future.one("Get", uid(key)).reason == "InvalidMessage"
        assert bystander.one("Get", uid(key)).ok
        many = [batch_item("GetAttributeList", uid(key)) for _ in range(65)]
        assert bystander.request(*many)[0].reason == "InvalidMessage"
        assert bystander.one("Get", uid(key)).ok


def Item_unknown() -> t.Item:
    return t.Item(0x42FFF0, t.ItemType.INTEGER, 1)


def test_wrong_types_change_nothing_and_locate_is_capped(site: KmipSite) -> None:
    ctx = site.tls(site.issue("esx-1")[:2])
    with KmipConn(site.port, ctx) as c:
        object_type = aes_256_template()[0]
        aes = attribute("Cryptographic Algorithm", t.enumeration("AttributeValue", 3))
        wrong_length = t.struct_("TemplateAttribute", aes, attribute("Cryptographic Length", text("256")))
        assert c.one("Create", object_type, wrong_length).reason == "InvalidField"
        odd_size = t.struct_(
            "TemplateAttribute", aes, attribute("Cryptographic Length", t.integer("AttributeValue", 100))
        )
        assert c.one("Create", object_type, odd_size).reason == "InvalidField"
        located = c.one("Locate")
        assert located.payload is not None and located.payload.all("UniqueIdentifier") == []  # nothing was made
        key = _create(c)
        assert c.one("AddAttribute", uid(key), attribute("Name", text("not a structure"))).reason == "InvalidField"
        assert c.one("AddAttribute", uid(key), attribute("State", t.enumeration("AttributeValue", 2))).reason == (
            "PermissionDenied"
        )
        assert c.one("ModifyAttribute", uid(key), attribute("x-Name", text("a"), index=7)).reason == "ItemNotFound"
        assert c.one("DeleteAttribute", uid(key), t.text("AttributeName", "Unique Identifier")).reason == (
            "PermissionDenied"
        )
        assert c.one("GetAttributes", uid(key), t.text("AttributeName", "State")).attributes()["State"][0].value == 1
        for _ in range(4):
            _create(c)
        capped = c.one("Locate", t.integer("MaximumItems", 1_000_000))
        assert capped.payload is not None
        assert len(capped.payload.all("UniqueIdentifier")) == 3  # the server's max_locate_items
        assert capped.payload.first("LocatedItems").value == 5  # type: ignore[union-attr]


def test_a_client_sending_ahead_is_answered_in_order(site: KmipSite) -> None:
    """Requests sent ahead of their answers (more than one message's bound) are held back, not lost, and each
    is answered in order; the server stops reading the client until it has caught up, then goes on.

    The client writes and reads on one asyncio loop: one TLS object used by two threads at once (a sender
    thread's ``sendall`` beside the reader's ``recv``) is not safe in OpenSSL and broke the stream now and
    then."""
    ctx = site.tls(site.issue("esx-1")[:2])
    count = 4000  # about 400 KiB of requests: more than max_message_bytes (256 KiB) ahead of the answers
    with KmipConn(site.port, ctx) as c:
        key = _create(c)
        messages = [c.encode(batch_item("Get" if i % 2 else "DiscoverVersions", *((uid(key),) if i % 2 else ()),
                                        batch_id=i.to_bytes(4, "big"))) for i in range(count)]  # fmt: skip
    assert sum(len(m) for m in messages) > 262144
    bounds = t.Bounds(max_bytes=1 << 24)

    async def pipelined() -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port, ssl=ctx)
        writer.write(b"".join(messages))  # all of it at once: the transport sends as the server takes it
        raw = []
        for _ in range(count):
            head = await asyncio.wait_for(reader.readexactly(8), 20)
            raw.append(head + await asyncio.wait_for(reader.readexactly(t.frame_length(head, bounds) - 8), 20))
        await writer.drain()
        writer.close()
        return raw

    answers = [t.decode(message) for message in asyncio.run(pipelined())]
    for i, answer in enumerate(answers):
        [item] = answer.all("BatchItem")
        assert item.first("UniqueBatchItemId").value == i.to_bytes(4, "big")  # type: ignore[union-attr]
        assert item.first("ResultStatus").value == 0  # type: ignore[union-attr]


def test_an_idle_connection_is_closed_and_a_busy_one_is_not(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    """Deadlines are kept by one sweep of the listener's connections (a quarter of the shorter timeout), not a
    timer each: a connection that asked once and then waits past ``idle_timeout`` is closed; one that keeps
    asking, each time within it, is served all along."""
    site = make_kmip_site(tmp_path, server_factory, secret_registry, env={"KEYSTEWARD_KMIP_IDLE_TIMEOUT": "1"})
    ctx = site.tls(site.issue("esx-1")[:2])
    with KmipConn(site.port, ctx) as busy, KmipConn(site.port, ctx) as idle:
        key = _create(busy)
        assert idle.one("Get", uid(key)).ok
        started = time.monotonic()
        while time.monotonic() - started < 3:  # three idle timeouts: the busy one asks every 0.3 s
            assert busy.one("Get", uid(key)).ok
            time.sleep(0.3)
        idle.sock.settimeout(2)
        try:
            closed = idle.sock.recv(1) == b""
        except TimeoutError:
            closed = False  # still open: no sweep closed it
        except (ConnectionError, OSError):
            closed = True
        assert closed
        assert busy.one("Get", uid(key)).ok
