"""GetMessage and ListMessages over gRPC: a message with its history, a bulk or a reference page by
page, answers that stay within a default client's limit, bad requests."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import TYPE_CHECKING

import grpc
import pytest

from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    ListMessagesRequest,
    ListMessagesResponse,
)
from tests.conftest import Running
from tests.helpers import (
    GMS,
    SSR,
    TIMEOUT,
    S,
    failure,
    get_message,
    gms,
    gms_payload,
    ingest,
    ssr,
    ssr_payload,
)

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub as Stub


# Each test runs over SQLite and over PostgreSQL (conftest.py).
pytestmark = pytest.mark.engines


async def list_messages(stub: Stub, request: ListMessagesRequest) -> ListMessagesResponse:
    response: ListMessagesResponse = await asyncio.wait_for(stub.ListMessages(request), TIMEOUT)
    return response


# --- GetMessage ----------------------------------------------------------------------------------


async def test_get_an_unknown_message_is_not_found(server: Running) -> None:
    await ingest(server.stub, gms_payload(gms("known")))
    details = await failure(server.stub.GetMessage(GetMessageRequest(message_id="unknown")))
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.reason == "MESSAGE_NOT_FOUND"
    assert details.metadata == {"message_id": "unknown"}
    details = await failure(server.stub.GetMessage(GetMessageRequest(message_id="known", source=SSR)))
    assert details.reason == "MESSAGE_NOT_FOUND"


async def test_get_a_message_without_its_id(server: Running) -> None:
    details = await failure(server.stub.GetMessage(GetMessageRequest(include_history=True)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "MISSING_FIELD"
    assert details.fields == ["message_id"]


async def test_get_a_message_with_history(server: Running) -> None:
    payloads = [
        gms_payload(gms("m-1", "SENT", seconds=1, reference="R")),
        gms_payload(gms("m-1", "DELIVERED", seconds=3)),
        gms_payload(gms("m-1", "SENT", seconds=2)),
    ]
    for payload in payloads:
        await ingest(server.stub, payload)
    await ingest(server.stub, ssr_payload(ssr("m-1", "EXPIRED", seconds=1)))  # the same id at another source

    plain = await get_message(server.stub, GetMessageRequest(message_id="m-1"))
    assert [(report.source, report.status) for report in plain.messages] == [
        (GMS, S.DELIVERY_STATUS_DELIVERED),
        (SSR, S.DELIVERY_STATUS_EXPIRED),
    ]
    assert list(plain.history) == []
    assert plain.messages[0].reference == "R"  # from the earlier report that had it

    with_history = await get_message(
        server.stub, GetMessageRequest(message_id="m-1", source=GMS, include_history=True)
    )
    assert [report.source for report in with_history.messages] == [GMS]
    assert not with_history.history_truncated
    assert [report.raw_payload for report in with_history.history] == payloads  # stored order, verbatim
    assert [report.status for report in with_history.history] == [
        S.DELIVERY_STATUS_SENT,
        S.DELIVERY_STATUS_DELIVERED,
        S.DELIVERY_STATUS_SENT,
    ]


async def test_list_a_bulk_page_by_page_while_reports_keep_arriving(server: Running) -> None:
    existing = [f"b-{number:02}" for number in range(20)]
    await ingest(
        server.stub, ssr_payload(*(ssr(message_id, "SENT", bulk_id="BULK") for message_id in existing))
    )
    await ingest(server.stub, ssr_payload(ssr("elsewhere", bulk_id="OTHER")))

    written = asyncio.Event()
    writes = 0

    async def keep_ingesting() -> None:
        nonlocal writes
        for number in range(40):
            # A new message of the bulk, and a change to one that existed (it must keep its place).
            await ingest(
                server.stub,
                ssr_payload(
                    ssr(f"new-{number:02}", "SENT", bulk_id="BULK"),
                    ssr(existing[number % 20], "DELIVERED", seconds=100 + number, bulk_id="BULK"),
                ),
            )
            writes += 1
            written.set()

    writer = asyncio.create_task(keep_ingesting())
    try:
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await list_messages(
                server.stub, ListMessagesRequest(bulk_id="BULK", page_size=3, page_token=token)
            )
            pages += 1
            assert len(page.messages) <= 3
            assert all(report.bulk_id == "BULK" for report in page.messages)
            seen += [report.message_id for report in page.messages]
            if pages == 1:
                await asyncio.wait_for(written.wait(), TIMEOUT)  # reports arrive between pages
            if not page.next_page_token:
                break
            token = page.next_page_token
        writes_while_paging = writes
    finally:
        await writer
    assert writes_while_paging > 0
    assert len(seen) == len(set(seen)), "a message appeared on two pages"
    assert seen[: len(existing)] == existing  # every message from before, exactly once, in order
    assert all(message_id.startswith("new-") for message_id in seen[len(existing) :])
    assert "elsewhere" not in seen


async def test_list_a_bulk_counts_statuses_across_the_whole_bulk(server: Running) -> None:
    names = ["DELIVERED", "SENT", "DELIVERED", "EXPIRED", "DELIVERED", "UNDELIVERED", "SENT"]
    await ingest(
        server.stub,
        ssr_payload(*(ssr(f"m-{number}", name, bulk_id="B") for number, name in enumerate(names))),
    )
    await ingest(server.stub, ssr_payload(ssr("m-0", "SEEN", seconds=60)))  # a seen report has no bulk id
    await ingest(server.stub, ssr_payload(ssr("other", "REJECTED", bulk_id="C")))
    expected = [
        (S.DELIVERY_STATUS_SENT, 2),
        (S.DELIVERY_STATUS_DELIVERED, 2),
        (S.DELIVERY_STATUS_UNDELIVERED, 1),
        (S.DELIVERY_STATUS_EXPIRED, 1),
        (S.DELIVERY_STATUS_SEEN, 1),
    ]
    token = ""
    seen: list[str] = []
    while True:
        page = await list_messages(
            server.stub, ListMessagesRequest(bulk_id="B", page_size=2, page_token=token)
        )
        assert [(count.status, count.count) for count in page.status_counts] == expected
        assert page.total_size == len(names)
        seen += [report.message_id for report in page.messages]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == [f"m-{number}" for number in range(len(names))]

    empty = await list_messages(server.stub, ListMessagesRequest(bulk_id="unknown"))
    assert (list(empty.messages), empty.next_page_token, empty.total_size, list(empty.status_counts)) == (
        [],
        "",
        0,
        [],
    )


# Near the item limit (64 KiB): 100 such states are about 5 MB, over a default client's 4 MiB.
BIG_ITEM_PADDING = 50_000


def big_ssr(message_id: str, *, seconds: int = 0, bulk_id: str | None = None) -> dict[str, object]:
    """A report whose text is about 50 KB (an ignored member pads it), as every state keeps its text."""
    return {**ssr(message_id, "SENT", seconds=seconds, bulk_id=bulk_id), "padding": "x" * BIG_ITEM_PADDING}


async def test_list_pages_stop_at_about_a_mebibyte(server: Running) -> None:
    ids = [f"big-{number:03}" for number in range(100)]
    for start in range(0, len(ids), 25):
        await ingest(server.stub, ssr_payload(*(big_ssr(i, bulk_id="FAT") for i in ids[start : start + 25])))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        # The fixture's channel has gRPC's default options: it accepts answers of up to 4 MiB.
        pages += 1
        page = await list_messages(
            server.stub, ListMessagesRequest(bulk_id="FAT", page_size=1000, page_token=token)
        )
        assert 0 < page.ByteSize() <= (1 << 20) + 64 * 1024
        assert page.total_size == len(ids)
        seen += [report.message_id for report in page.messages]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == ids  # every message exactly once, in order
    assert pages >= 5  # 1000 a page by count, but about 5 MB in all


async def test_get_message_history_stops_at_about_a_mebibyte(server: Running) -> None:
    reports = 30  # 30 distinct reports of about 50 KB: 1.5 MB of history
    for seconds in range(reports):
        await ingest(server.stub, ssr_payload(big_ssr("chatty", seconds=seconds)))
    answer = await get_message(server.stub, GetMessageRequest(message_id="chatty", include_history=True))
    assert answer.history_truncated
    assert 10 <= len(answer.history) < reports
    assert answer.ByteSize() <= (1 << 20) + 2 * 64 * 1024  # the history, and the state
    # The oldest first, in stored order: the history up to where it stopped.
    assert [report.event_time.seconds for report in answer.history] == [
        report.event_time.seconds for report in sorted(answer.history, key=lambda r: r.event_time.seconds)
    ]
    assert answer.history[0].event_time.seconds < answer.history[-1].event_time.seconds


async def test_list_page_size_defaults_to_100_and_is_capped_at_1000(server: Running) -> None:
    await ingest(server.stub, ssr_payload(*(ssr(f"m-{number:04}", bulk_id="BIG") for number in range(1001))))
    default = await list_messages(server.stub, ListMessagesRequest(bulk_id="BIG"))
    assert len(default.messages) == 100
    assert default.next_page_token
    capped = await list_messages(server.stub, ListMessagesRequest(bulk_id="BIG", page_size=5000))
    assert len(capped.messages) == 1000
    last = await list_messages(
        server.stub, ListMessagesRequest(bulk_id="BIG", page_size=5000, page_token=capped.next_page_token)
    )
    assert [report.message_id for report in last.messages] == ["m-1000"]
    assert last.next_page_token == ""
    assert last.total_size == 1001


async def test_list_by_reference(server: Running) -> None:
    await ingest(
        server.stub, gms_payload(gms("g-1", reference="REF-1"), gms("g-2", "SENT", reference="REF-2"))
    )
    await ingest(server.stub, ssr_payload(ssr("s-1", "EXPIRED", reference="REF-1")))
    await ingest(server.stub, gms_payload(gms("g-3", "UNDELIVERED", reference="REF-1")))

    both = await list_messages(server.stub, ListMessagesRequest(reference="REF-1"))
    assert [(report.source, report.message_id) for report in both.messages] == [
        (GMS, "g-1"),
        (SSR, "s-1"),
        (GMS, "g-3"),
    ]
    assert both.total_size == 3
    assert list(both.status_counts) == []  # counts are for bulks
    gms_only = await list_messages(
        server.stub, ListMessagesRequest(reference="REF-1", source=GMS, page_size=1)
    )
    assert [report.message_id for report in gms_only.messages] == ["g-1"]
    assert gms_only.total_size == 2
    rest = await list_messages(
        server.stub,
        ListMessagesRequest(reference="REF-1", source=GMS, page_size=1, page_token=gms_only.next_page_token),
    )
    assert [report.message_id for report in rest.messages] == ["g-3"]
    assert rest.next_page_token == ""

    unknown = await list_messages(server.stub, ListMessagesRequest(reference="nobody"))
    assert (list(unknown.messages), unknown.total_size) == ([], 0)


def forged_token(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("not a token!", id="garbage"),
        pytest.param("e30", id="json-object"),
        pytest.param(forged_token("bulk_id", "B", 0), id="short"),
        pytest.param(forged_token("bulk_id", "B", 0, -3), id="negative"),
        pytest.param(forged_token("bulk_id", "B", 0, "7"), id="string-position"),
        pytest.param(forged_token("bulk_id", "B", 0, 2**70), id="huge-position"),
        pytest.param(base64.urlsafe_b64encode(b"[" * 200_000).decode().rstrip("="), id="deeply-nested"),
    ],
)
async def test_list_with_a_bad_page_token(server: Running, token: str) -> None:
    await ingest(server.stub, ssr_payload(*(ssr(f"m-{number}", bulk_id="B") for number in range(3))))
    details = await failure(
        server.stub.ListMessages(ListMessagesRequest(bulk_id="B", page_size=1, page_token=token))
    )
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_PAGE_TOKEN"
    assert details.fields == ["page_token"]


async def test_list_with_a_page_token_of_another_request(server: Running) -> None:
    await ingest(
        server.stub,
        ssr_payload(*(ssr(f"m-{number}", bulk_id="A", reference="A") for number in range(3))),
    )
    await ingest(server.stub, ssr_payload(*(ssr(f"n-{number}", bulk_id="B") for number in range(3))))
    first = await list_messages(server.stub, ListMessagesRequest(bulk_id="A", page_size=1))
    assert first.next_page_token
    for other in (
        ListMessagesRequest(bulk_id="B", page_size=1, page_token=first.next_page_token),
        ListMessagesRequest(reference="A", page_size=1, page_token=first.next_page_token),
        ListMessagesRequest(bulk_id="A", source=SSR, page_size=1, page_token=first.next_page_token),
    ):
        details = await failure(server.stub.ListMessages(other))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "PAGE_TOKEN_MISMATCH"
        assert details.fields == ["page_token"]
    # With its own request the token goes on where the first page ended.
    second = await list_messages(
        server.stub, ListMessagesRequest(bulk_id="A", page_size=1, page_token=first.next_page_token)
    )
    assert [report.message_id for report in second.messages] == ["m-1"]


@pytest.mark.parametrize(
    ("request_", "reason", "fields"),
    [
        pytest.param(
            ListMessagesRequest(bulk_id="B", page_size=-1), "INVALID_PAGE_SIZE", ["page_size"], id="page-size"
        ),
        pytest.param(
            ListMessagesRequest(reference="R", page_size=-100),
            "INVALID_PAGE_SIZE",
            ["page_size"],
            id="page-size-ref",
        ),
        pytest.param(ListMessagesRequest(), "MISSING_SELECTOR", ["bulk_id"], id="no-selector"),
        pytest.param(ListMessagesRequest(bulk_id=""), "EMPTY_SELECTOR", ["bulk_id"], id="empty-bulk-id"),
    ],
)
async def test_list_with_an_invalid_request(
    server: Running, request_: ListMessagesRequest, reason: str, fields: list[str]
) -> None:
    details = await failure(server.stub.ListMessages(request_))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == reason
    assert details.fields == fields
