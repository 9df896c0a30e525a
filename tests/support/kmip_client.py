"""A small KMIP client on keysteward's own codec, for what PyKMIP cannot send (AddAttribute, bad messages)."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import OBJECT_TYPE, OPERATION, QUERY_FUNCTION, RESULT_REASON, RESULT_STATUS
from keysteward.formats.kmip_ttlv import Item
from keysteward.server.run import CA_REFRESH_SECONDS

REASONS = {number: name for name, number in RESULT_REASON.items()}
STATUS = {number: name for name, number in RESULT_STATUS.items()}


class KmipConn:
    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext,
        version: tuple[int, int] = (1, 4),
        session: ssl.SSLSession | None = None,
        timeout: float = 20,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, session=session)
        self.version = version

    def __enter__(self) -> KmipConn:
        return self

    def __exit__(self, *_: Any) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.read()

    def read(self) -> bytes:
        head = self._exactly(8)
        return head + self._exactly(t.frame_length(head, t.Bounds(max_bytes=1 << 24)) - 8)

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the server")
            out += chunk
        return out

    def request(self, *items: Item) -> list[Result]:
        answer = t.decode(self.send_raw(self.encode(*items)))
        assert answer.name == "ResponseMessage"
        return [Result(item) for item in answer.all("BatchItem")]

    def encode(self, *items: Item) -> bytes:
        """The request message of these batch items, encoded (a client may send the same bytes again)."""
        header = t.struct_(
            "RequestHeader",
            t.struct_("ProtocolVersion", t.integer("ProtocolVersionMajor", self.version[0]),
                      t.integer("ProtocolVersionMinor", self.version[1])),
            t.integer("BatchCount", len(items)),
        )  # fmt: skip
        return t.encode(t.struct_("RequestMessage", header, *items))

    def one(self, operation: str, *payload: Item | None, batch_id: bytes | None = None) -> Result:
        [result] = self.request(batch_item(operation, *payload, batch_id=batch_id))
        return result


class Result:
    def __init__(self, item: Item) -> None:
        self.item = item
        status = item.first("ResultStatus")
        assert status is not None
        self.status = STATUS[int(status.value)]  # type: ignore[arg-type]
        reason = item.first("ResultReason")
        self.reason = REASONS[int(reason.value)] if reason is not None else None  # type: ignore[arg-type]
        self.payload = item.first("ResponsePayload")
        bid = item.first("UniqueBatchItemId")
        self.batch_id = bid.value if bid is not None else None

    @property
    def ok(self) -> bool:
        return self.status == "Success"

    def uid(self) -> str:
        assert self.payload is not None, self.reason
        found = self.payload.first("UniqueIdentifier")
        assert found is not None
        return str(found.value)

    def attributes(self) -> dict[str, list[Item]]:
        assert self.payload is not None
        out: dict[str, list[Item]] = {}
        for attribute in self.payload.all("Attribute"):
            name, value = attribute.first("AttributeName"), attribute.first("AttributeValue")
            assert name is not None and value is not None
            out.setdefault(str(name.value), []).append(value)
        return out


def batch_item(operation: str, *payload: Item | None, batch_id: bytes | None = None) -> Item:
    return t.struct_(
        "BatchItem",
        t.enumeration("Operation", OPERATION[operation]),
        t.byte_string("UniqueBatchItemId", batch_id) if batch_id is not None else None,
        t.struct_("RequestPayload", *payload),
    )


def attribute(name: str, value: Item, index: int | None = None) -> Item:
    return t.struct_(
        "Attribute",
        t.text("AttributeName", name),
        t.integer("AttributeIndex", index) if index is not None else None,
        Item(t.TAGS["AttributeValue"], value.type, value.value),
    )


def uid(value: str) -> Item:
    return t.text("UniqueIdentifier", value)


def text(value: str) -> Item:
    return t.text("AttributeValue", value)


def aes_256_template() -> list[Item]:
    """What vCenter sends: algorithm, length and usage mask, no Name."""
    return [
        t.enumeration("ObjectType", OBJECT_TYPE["SymmetricKey"]),
        t.struct_(
            "TemplateAttribute",
            attribute("Cryptographic Algorithm", t.enumeration("AttributeValue", 3)),
            attribute("Cryptographic Length", t.integer("AttributeValue", 256)),
            attribute("Cryptographic Usage Mask", t.integer("AttributeValue", 12)),
        ),
    ]


def query_server_information() -> Item:
    return t.enumeration("QueryFunction", QUERY_FUNCTION["QueryServerInformation"])


def wait_served(port: int, ctx: ssl.SSLContext, timeout: float) -> bool:
    """Until every worker of a server serves ``ctx``'s client, False if not within ``timeout`` seconds.

    A worker learns a new tenant CA from the database within about a second (the one that made it at once)
    and refuses the client's handshake meanwhile. New connections must be served eight times in a row, and
    as those eight can all be the worker that made the CA, one refresh period more follows them: without it,
    4 of 27 runs of a TLS 1.3 new-connection load lost 17 to 31 connections within their first second (the
    other worker refused the client's certificate, which TLS 1.3 shows the client only at its first read)."""
    deadline, in_a_row = time.monotonic() + timeout, 0
    while in_a_row < 8:
        if time.monotonic() > deadline:
            return False
        try:
            with KmipConn(port, ctx) as conn:
                in_a_row = in_a_row + 1 if conn.one("DiscoverVersions").ok else 0
        except OSError:  # ssl.SSLError, ConnectionError and TimeoutError among them
            in_a_row = 0
            time.sleep(0.2)
    time.sleep(CA_REFRESH_SECONDS + 0.5)
    return True
