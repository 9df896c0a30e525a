"""KMIP request parsing: a message that is not a request, a header without version or batch count, a version
not served, a batch count that does not match, too many items all answer Invalid Message; batch item ids and
the continuation option are read; responses carry only what the version defines."""

from __future__ import annotations

import pytest

from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import OPERATION
from keysteward.kmip import messages
from keysteward.kmip.errors import KmipError

pytestmark = pytest.mark.unit


def header(version: tuple[int, int] | None = (1, 4), count: int | None = 1, *extra: t.Item) -> t.Item:
    return t.struct_(
        "RequestHeader",
        t.struct_("ProtocolVersion", t.integer("ProtocolVersionMajor", version[0]),
                  t.integer("ProtocolVersionMinor", version[1])) if version else None,
        t.integer("BatchCount", count) if count is not None else None,
        *extra,
    )  # fmt: skip


def item(operation: str = "Get", batch_id: bytes | None = None) -> t.Item:
    return t.struct_(
        "BatchItem",
        t.enumeration("Operation", OPERATION[operation]),
        t.byte_string("UniqueBatchItemId", batch_id) if batch_id else None,
        t.struct_("RequestPayload"),
    )


def test_batch_order_and_undo_are_read() -> None:
    """Batch Order Option True or False: the items run in the order sent (which honours both); Undo stops at
    the first error like Stop (what is done is not undone: docs/kmip.md)."""
    for ordered in (True, False):
        order = t.boolean("BatchOrderOption", ordered)
        parsed = messages.parse(t.struct_("RequestMessage", header((2, 1), 2, order), item(), item("Locate")))
        assert [i.operation for i in parsed.items] == [OPERATION["Get"], OPERATION["Locate"]]
    undo = t.enumeration("BatchErrorContinuationOption", 3)
    assert messages.parse(t.struct_("RequestMessage", header((2, 1), 1, undo), item())).stop_on_error


def test_a_request_is_read() -> None:
    option = t.enumeration("BatchErrorContinuationOption", 1)
    parsed = messages.parse(t.struct_("RequestMessage", header((1, 2), 2, option), item(), item("Locate", b"\x07")))
    assert parsed.version == (1, 2) and not parsed.stop_on_error
    assert [(i.operation, i.batch_id) for i in parsed.items] == [
        (OPERATION["Get"], None),
        (OPERATION["Locate"], b"\x07"),
    ]


@pytest.mark.parametrize(
    "message",
    [
        t.struct_("ResponseMessage", header(), item()),
        t.struct_("RequestMessage", item()),
        t.struct_("RequestMessage", header(None), item()),
        t.struct_("RequestMessage", header((3, 0)), item()),
        t.struct_("RequestMessage", header((2, 2)), item()),
        t.struct_("RequestMessage", header((1, 4), None), item()),
        t.struct_("RequestMessage", header((1, 4), 2), item()),
        t.struct_("RequestMessage", header((1, 4), 0)),
        t.struct_("RequestMessage", header((1, 4), 65), *[item()] * 65),
        t.struct_(
            "RequestMessage",
            t.struct_("RequestHeader", t.text("ProtocolVersion", "1.4"), t.integer("BatchCount", 1)),
            item(),
        ),
        t.struct_("RequestMessage", header(), t.integer("BatchItem", 1)),
        t.struct_("RequestMessage", header((1, 4), 1, t.integer("BatchOrderOption", 1)), item()),
        t.struct_("RequestMessage", header((1, 4), 1, t.text("BatchErrorContinuationOption", "Stop")), item()),
        t.struct_("RequestMessage", header((1, 4), 1, t.enumeration("BatchErrorContinuationOption", 9)), item()),
    ],
)
def test_bad_requests_are_invalid_messages(message: t.Item) -> None:
    with pytest.raises(KmipError) as refused:
        messages.parse(message)
    assert refused.value.reason == "InvalidMessage"


def test_a_response_echoes_the_batch_item_and_the_version() -> None:
    failed = messages.response_item(OPERATION["Get"], b"\x01", None, KmipError("ItemNotFound", "no such object"))
    answer = t.decode(t.encode(messages.response((1, 1), [failed])))
    version = answer.first("ResponseHeader").first("ProtocolVersion")  # type: ignore[union-attr]
    assert [i.value for i in version.items] == [1, 1]  # type: ignore[union-attr]
    [batch] = answer.all("BatchItem")
    assert batch.first("UniqueBatchItemId").value == b"\x01"  # type: ignore[union-attr]
    assert batch.first("ResponsePayload") is None
    assert messages.version_of(t.struct_("RequestMessage", t.integer("BatchCount", 1))) == messages.SUPPORTED[0]
