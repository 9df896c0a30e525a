"""KMIP request and response messages: the header, the batch items, the version a response is written in.

A request is ``RequestMessage{RequestHeader{ProtocolVersion, BatchCount, ...}, BatchItem*}``; each batch item
names its Operation, may carry a Unique Batch Item ID (echoed in its response item) and a Request Payload.
The response is in the request's protocol version (:data:`SUPPORTED` lists those served).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_enums import BATCH_ERROR_CONTINUATION_OPTION, OPERATION, RESULT_STATUS
from keysteward.formats.kmip_ttlv import Item, ItemType
from keysteward.kmip.errors import KmipError, reason_for

SUPPORTED: Final = ((1, 4), (1, 3), (1, 2), (1, 1), (1, 0), (2, 1), (2, 0))
"""Protocol versions served, most preferred first (what DiscoverVersions answers): 1.4 first, the version
vSphere's flows and custom attributes are served in; 2.0 and 2.1 to clients that ask in them."""
MAX_BATCH: Final = 64
OPERATION_NAMES: Final = {number: name for name, number in OPERATION.items()}


@dataclass(frozen=True)
class BatchItem:
    operation: int | None
    """None when the item names no (known) operation."""
    batch_id: bytes | None
    payload: Item | None


@dataclass(frozen=True)
class Request:
    version: tuple[int, int]
    items: tuple[BatchItem, ...]
    stop_on_error: bool


def _int(item: Item | None, what: str) -> int:
    if item is None or item.type not in (ItemType.INTEGER, ItemType.ENUMERATION) or not isinstance(item.value, int):
        raise KmipError("InvalidMessage", f"{what} is missing or not a number")
    return item.value


def version_of(message: Item) -> tuple[int, int]:
    """The request's protocol version, as far as it can be read (for an answer to a bad message)."""
    try:
        header = message.first("RequestHeader")
        version = header.first("ProtocolVersion") if header is not None else None
        if version is not None:
            return _int(version.first("ProtocolVersionMajor"), "major"), _int(
                version.first("ProtocolVersionMinor"), "m"
            )
    except (KmipError, t.TtlvError):
        pass
    return SUPPORTED[0]


def parse(message: Item) -> Request:
    """The request's header and batch items; KmipError(InvalidMessage) for a message that is not one."""
    if message.tag != t.TAGS["RequestMessage"] or message.type is not ItemType.STRUCTURE:
        raise KmipError("InvalidMessage", "not a KMIP request message")
    header = message.first("RequestHeader")
    if header is None or header.type is not ItemType.STRUCTURE:
        raise KmipError("InvalidMessage", "the request has no header")
    version_item = header.first("ProtocolVersion")
    if version_item is None or version_item.type is not ItemType.STRUCTURE:
        raise KmipError("InvalidMessage", "the request header has no protocol version")
    version = (
        _int(version_item.first("ProtocolVersionMajor"), "Protocol Version Major"),
        _int(version_item.first("ProtocolVersionMinor"), "Protocol Version Minor"),
    )
    if version not in SUPPORTED:
        raise KmipError("InvalidMessage", f"protocol version {version[0]}.{version[1]} is not served")
    count = _int(header.first("BatchCount"), "Batch Count")
    batch = message.all("BatchItem")
    if count != len(batch) or not 1 <= count <= MAX_BATCH:
        raise KmipError("InvalidMessage", f"the batch count does not match 1 to {MAX_BATCH} batch items")
    option = header.first("BatchErrorContinuationOption")
    if option is not None and (option.type is not ItemType.ENUMERATION
                               or option.value not in BATCH_ERROR_CONTINUATION_OPTION.values()):  # fmt: skip
        raise KmipError("InvalidMessage", "the Batch Error Continuation Option is Continue, Stop or Undo")
    stop = option is None or option.value != BATCH_ERROR_CONTINUATION_OPTION["Continue"]  # Undo: stops (not undone)
    order = header.first("BatchOrderOption")
    if order is not None and order.type is not ItemType.BOOLEAN:
        raise KmipError("InvalidMessage", "the Batch Order Option is a boolean")
    # Batch Order Option: items always run one after another in the order sent, which honours True (in order)
    # and False (any order will do) alike.
    items = []
    for raw in batch:
        if raw.type is not ItemType.STRUCTURE:
            raise KmipError("InvalidMessage", "a batch item is not a structure")
        op = raw.first("Operation")
        bid = raw.first("UniqueBatchItemId")
        payload = raw.first("RequestPayload")
        operation = op.value if op is not None and op.type is ItemType.ENUMERATION else None
        items.append(
            BatchItem(
                operation if isinstance(operation, int) else None,
                bid.value if bid is not None and isinstance(bid.value, bytes) else None,
                payload if payload is not None and payload.type is ItemType.STRUCTURE else None,
            )
        )
    return Request(version, tuple(items), stop)


def _version(version: tuple[int, int]) -> Item:
    return t.struct_("ProtocolVersion", t.integer("ProtocolVersionMajor", version[0]),
                     t.integer("ProtocolVersionMinor", version[1]))  # fmt: skip


def response_item(
    operation: int | None, batch_id: bytes | None, payload: Item | None = None, error: KmipError | None = None
) -> Item:
    status = RESULT_STATUS["Success"] if error is None else RESULT_STATUS["OperationFailed"]
    return t.struct_(
        "BatchItem",
        t.enumeration("Operation", operation) if operation is not None else None,
        t.byte_string("UniqueBatchItemId", batch_id) if batch_id is not None else None,
        t.enumeration("ResultStatus", status),
        t.enumeration("ResultReason", reason_for(error)) if error is not None else None,
        t.text("ResultMessage", error.message[:200]) if error is not None else None,
        payload if error is None else None,
    )


def response(version: tuple[int, int], items: list[Item]) -> Item:
    header = t.struct_(
        "ResponseHeader",
        _version(version),
        t.date_time("TimeStamp", int(time.time())),
        t.integer("BatchCount", len(items)),
    )
    return t.struct_("ResponseMessage", header, *items)


def failure(version: tuple[int, int], error: KmipError) -> Item:
    """The answer to a message that cannot be processed at all: one failed item."""
    return response(version, [response_item(None, None, None, error)])
