"""Ingest, Fetch and Stream over gRPC (grpc.aio): the real server, in-process, on a real SQLite file."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import (
    FetchRequest,
    FetchResponse,
    IngestOutcome,
    IngestRequest,
    IngestResponse,
    StreamBatchesRequest,
    StreamBatchesResponse,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from deliveryreport.v1.provider_formats_pb2 import GmsReport, GmsReports
from dlrhub import app as dlrhub_app
from dlrhub.config import Settings
from dlrhub.feed.encoding import StreamEncoder
from dlrhub.feed.follow import Heartbeat, follow_batches
from dlrhub.feed.hub import Hub
from dlrhub.store import SqliteStore
from dlrhub.store.base import Change, ChangeFilter
from tests.conftest import FakeClock, Running

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub as Stub

    StreamCall = grpc.aio.UnaryStreamCall[StreamRequest, StreamResponse]
    BatchCall = grpc.aio.UnaryStreamCall[StreamBatchesRequest, StreamBatchesResponse]

S = DeliveryStatus
ACCEPTED = IngestOutcome.INGEST_OUTCOME_ACCEPTED
DUPLICATE = IngestOutcome.INGEST_OUTCOME_DUPLICATE
REJECTED = IngestOutcome.INGEST_OUTCOME_REJECTED
GMS = Source.SOURCE_GMS
SSR = Source.SOURCE_SENT_SMS_REPORT

TIMEOUT = 10.0
EPOCH = datetime(2024, 3, 1, tzinfo=UTC)


# --- payloads ------------------------------------------------------------------------------------

SSR_STATUS: dict[str, tuple[int, int]] = {
    "ACCEPTED": (1, 26),
    "SENT": (3, 2),
    "DELIVERED": (3, 5),
    "UNDELIVERED": (2, 9),
    "EXPIRED": (4, 29),
    "REJECTED": (5, 6),
}
GMS_STATUS: dict[str, tuple[int, int, int | None]] = {
    "SENT": (1, 11, None),
    "DELIVERED": (2, 23, 23011),
    "UNDELIVERED": (3, 35, None),
    "EXPIRED": (3, 35, 35015),
}


def status(name: str) -> DeliveryStatus.ValueType:
    return S.Value(f"DELIVERY_STATUS_{name}")


def ssr(
    message_id: str,
    name: str = "DELIVERED",
    *,
    seconds: int = 0,
    bulk_id: str | None = None,
    reference: str | None = None,
    channel: str | None = None,
) -> dict[str, object]:
    """One SentSMSReport report; name "SEEN" gives a seen report (seenAt, no status)."""
    moment = (EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
    report: dict[str, object] = {"messageId": message_id, "to": "41793026727", "from": "InfoSMS"}
    if name == "SEEN":
        report["seenAt"] = moment
    else:
        group_id, status_id = SSR_STATUS[name]
        report["status"] = {"groupId": group_id, "id": status_id, "name": f"{name}_X"}
        report["doneAt"] = moment
    if bulk_id is not None:
        report["bulkId"] = bulk_id
    if reference is not None:
        report["callbackData"] = reference
    if channel is not None:
        report["channel"] = channel
    return report


def gms(
    message_id: str,
    name: str = "DELIVERED",
    *,
    seconds: int = 0,
    reference: str | None = None,
    sent_via: str = "sms",
) -> dict[str, object]:
    """One GMS report."""
    gms_status, substatus, hyber_status = GMS_STATUS[name]
    report: dict[str, object] = {
        "number": 380961111111,
        "time": int((EPOCH + timedelta(seconds=seconds)).timestamp() * 1000),
        "status": gms_status,
        "substatus": substatus,
        "message_id": message_id,
        "sent_via": sent_via,
    }
    if hyber_status is not None:
        report["hyber_status"] = hyber_status
    if reference is not None:
        report["extra_id"] = reference
    return report


def ssr_payload(*reports: dict[str, object]) -> str:
    return json.dumps({"results": list(reports)})


def gms_payload(*reports: dict[str, object]) -> str:
    return json.dumps(reports[0] if len(reports) == 1 else list(reports))


def payload_of(report: dict[str, object]) -> str:
    return ssr_payload(report) if "messageId" in report else gms_payload(report)


async def ingest(stub: Stub, payload: str, request_id: str = "") -> IngestResponse:
    response: IngestResponse = await asyncio.wait_for(
        stub.Ingest(IngestRequest(payload=payload, request_id=request_id)), TIMEOUT
    )
    return response


async def ingest_each(stub: Stub, *reports: dict[str, object]) -> list[int]:
    """Ingests the reports one call at a time, in order; returns their cursors."""
    cursors = []
    for report in reports:
        response = await ingest(stub, payload_of(report))
        assert [result.outcome for result in response.results] == [ACCEPTED]
        cursors.append(int(response.results[0].cursor))
    return cursors


async def fetch(stub: Stub, request: FetchRequest) -> FetchResponse:
    response: FetchResponse = await asyncio.wait_for(stub.Fetch(request), TIMEOUT)
    return response


async def state_of(
    stub: Stub, message_id: str, source: Source.ValueType = Source.SOURCE_UNSPECIFIED
) -> DeliveryReport:
    response = await fetch(stub, FetchRequest(message_id=message_id, source=source))
    assert len(response.reports) == 1
    return response.reports[0]


async def history_of(stub: Stub, message_id: str) -> list[DeliveryReport]:
    response = await fetch(stub, FetchRequest(message_id=message_id, include_history=True))
    return list(response.history)


# --- errors --------------------------------------------------------------------------------------


@dataclass
class ErrorDetails:
    code: grpc.StatusCode
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: list[str] = field(default_factory=list)
    field_reasons: list[str] = field(default_factory=list)


def details_of(error: grpc.aio.AioRpcError) -> ErrorDetails:
    """The google.rpc.Status details of a failed call (ErrorInfo, BadRequest)."""
    metadata = cast("grpc.aio.Metadata", error.trailing_metadata())  # an aio error's metadata is aio Metadata
    encoded = [value for key, value in metadata if key == "grpc-status-details-bin"]
    assert len(encoded) == 1, "the error carries no google.rpc.Status"
    assert isinstance(encoded[0], bytes)
    status = status_pb2.Status.FromString(encoded[0])
    assert status.code == error.code().value[0]
    infos: list[error_details_pb2.ErrorInfo] = []
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(bad_request.field_violations)
    assert len(infos) == 1
    return ErrorDetails(
        code=error.code(),
        reason=infos[0].reason,
        domain=infos[0].domain,
        metadata=dict(infos[0].metadata),
        fields=[violation.field for violation in violations],
        field_reasons=[violation.reason for violation in violations],
    )


async def failure(call: Awaitable[Any]) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call, TIMEOUT)
    details = details_of(raised.value)
    assert details.domain == "dlrhub"
    return details


async def stream_failure(call: StreamCall) -> ErrorDetails:
    try:
        return await failure(call.read())
    finally:
        call.cancel()


# --- streams -------------------------------------------------------------------------------------


async def read_message(call: StreamCall) -> StreamResponse:
    message = await asyncio.wait_for(call.read(), TIMEOUT)
    assert isinstance(message, StreamResponse), "the stream ended"
    return message


async def read_changes(call: StreamCall, count: int, within: float = TIMEOUT) -> list[StreamResponse]:
    """The next `count` changes (heartbeats skipped: the 15 s default never fires in these tests)."""
    changes: list[StreamResponse] = []
    async with asyncio.timeout(within):
        while len(changes) < count:
            message = await read_message(call)
            if not message.heartbeat:
                changes.append(message)
    return changes


def cursors_of(messages: Sequence[StreamResponse]) -> list[int]:
    return [int(message.cursor) for message in messages]


async def read_start(call: StreamCall) -> int:
    """The first message: a heartbeat with the start position, sent as soon as the stream is live."""
    message = await read_message(call)
    assert message.heartbeat
    assert not message.HasField("report")
    assert not message.HasField("state")
    return int(message.cursor)


@asynccontextmanager
async def streaming(stub: Stub, request: StreamRequest, *, start: int) -> AsyncIterator[StreamCall]:
    """A stream that is live (its first heartbeat, at position `start`, has been read)."""
    call = stub.Stream(request)
    try:
        assert await read_start(call) == start
        yield call
    finally:
        call.cancel()


@dataclass
class OwnServer:
    """A dlrhub started by the test itself, for settings the shared fixture does not have."""

    app: dlrhub_app.App
    stub: Stub
    channel: grpc.aio.Channel
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.app.stop()


@asynccontextmanager
async def own_server(db: Path, clock: FakeClock, *, stream_buffer: int = 1024) -> AsyncIterator[OwnServer]:
    settings = Settings(listen="127.0.0.1:0", db=db, stream_buffer=stream_buffer, shutdown_grace=2.0)
    running = await dlrhub_app.start(settings, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    own = OwnServer(running, DeliveryReportServiceStub(channel), channel)
    try:
        yield own
    finally:
        await own.stop()
        await channel.close(None)


# --- Ingest: duplicates and out-of-order reports -------------------------------------------------


async def test_the_same_report_twice_is_a_duplicate(server: Running) -> None:
    payload = gms_payload(gms("m-1", seconds=10, reference="REF"))
    first = await ingest(server.stub, payload)
    assert [result.outcome for result in first.results] == [ACCEPTED]
    assert first.results[0].cursor
    assert (first.accepted_count, first.duplicate_count, first.rejected_count) == (1, 0, 0)

    second = await ingest(server.stub, payload)
    assert [result.outcome for result in second.results] == [DUPLICATE]
    assert second.results[0].cursor == ""
    assert second.results[0].report.message_id == "m-1"
    assert (second.accepted_count, second.duplicate_count, second.rejected_count) == (0, 1, 0)

    history = await history_of(server.stub, "m-1")
    assert [report.raw_payload for report in history] == [payload]
    assert server.app.store.latest_cursor() == int(first.results[0].cursor)


async def test_the_same_report_with_other_whitespace_and_key_order_is_a_duplicate(server: Running) -> None:
    report = ssr("m-1", "DELIVERED", seconds=5, bulk_id="B")
    compact = json.dumps({"results": [report]}, separators=(",", ":"))
    spaced = json.dumps({"results": [dict(reversed(report.items()))]}, indent=4)
    assert compact != spaced
    assert [r.outcome for r in (await ingest(server.stub, compact)).results] == [ACCEPTED]
    assert [r.outcome for r in (await ingest(server.stub, spaced)).results] == [DUPLICATE]
    history = await history_of(server.stub, "m-1")
    assert len(history) == 1
    assert history[0].raw_payload == json.dumps(report, separators=(",", ":"))  # the first text, verbatim


async def test_a_typed_report_is_the_same_report_as_its_json(server: Running) -> None:
    typed = GmsReport(
        number="380961111111",
        time=1477417294667,
        message_id="m-typed",
        status=2,
        substatus=23,
        sent_via="sms",
    )
    first = await server.stub.Ingest(IngestRequest(gms=GmsReports(reports=[typed])))
    assert [result.outcome for result in first.results] == [ACCEPTED]
    assert first.results[0].report.status == S.DELIVERY_STATUS_DELIVERED
    as_json = {
        "number": "380961111111",
        "time": 1477417294667,
        "message_id": "m-typed",
        "status": 2,
        "substatus": 23,
        "sent_via": "sms",
    }
    second = await ingest(server.stub, json.dumps(as_json))
    assert [result.outcome for result in second.results] == [DUPLICATE]


OUT_OF_ORDER = [
    pytest.param([("DELIVERED", 10), ("SENT", 5)], "DELIVERED", id="delivered-then-earlier-sent"),
    pytest.param([("DELIVERED", 10), ("SENT", 20)], "DELIVERED", id="delivered-then-later-sent"),
    pytest.param([("EXPIRED", 10), ("DELIVERED", 20)], "DELIVERED", id="expired-then-late-delivered"),
    pytest.param([("EXPIRED", 10), ("DELIVERED", 5)], "DELIVERED", id="expired-then-delivered-earlier"),
    pytest.param(
        [("DELIVERED", 10), ("UNDELIVERED", 20)], "DELIVERED", id="failure-never-replaces-delivered"
    ),
    pytest.param([("UNDELIVERED", 20), ("EXPIRED", 10)], "UNDELIVERED", id="later-failure-wins"),
    pytest.param([("SEEN", 10), ("DELIVERED", 20)], "SEEN", id="seen-then-later-delivered"),
    pytest.param([("DELIVERED", 20), ("SEEN", 10)], "SEEN", id="delivered-then-earlier-seen"),
    pytest.param([("SEEN", 10), ("EXPIRED", 30), ("SENT", 40)], "SEEN", id="seen-then-anything"),
]


@pytest.mark.parametrize(("reports", "expected"), OUT_OF_ORDER)
async def test_out_of_order_reports_end_in_the_same_state(
    server: Running, reports: list[tuple[str, int]], expected: str
) -> None:
    for message_id, order in (("forward", reports), ("backward", reports[::-1])):
        for name, seconds in order:
            response = await ingest(server.stub, ssr_payload(ssr(message_id, name, seconds=seconds)))
            assert [result.outcome for result in response.results] == [ACCEPTED]
        state = await state_of(server.stub, message_id)
        assert state.status == status(expected), message_id
        assert state.final
        assert len(await history_of(server.stub, message_id)) == len(reports)


# --- Ingest: rejections --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "bad_field"),
    [
        pytest.param(
            gms_payload(gms("g-0"), {"status": 2, "time": 1}, gms("g-2")), "[1].message_id", id="gms"
        ),
        pytest.param(
            ssr_payload(
                ssr("s-0"), {"messageId": "s-1", "doneAt": "2024-03-01T09:15:00.000+0000"}, ssr("s-2")
            ),
            "results[1].status",
            id="sent-sms-report",
        ),
    ],
)
async def test_one_bad_item_is_rejected_and_the_others_stored(
    server: Running, payload: str, bad_field: str
) -> None:
    response = await ingest(server.stub, payload)
    assert [result.index for result in response.results] == [0, 1, 2]
    assert [result.outcome for result in response.results] == [ACCEPTED, REJECTED, ACCEPTED]
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (2, 0, 1)
    bad = response.results[1]
    assert (bad.error.field, bad.error.reason) == (bad_field, "MISSING_FIELD")
    assert bad.error.description
    assert not bad.HasField("report")
    assert not bad.cursor
    prefix = response.results[0].report.message_id[0]
    for index in (0, 2):
        assert (await state_of(server.stub, f"{prefix}-{index}")).message_id == f"{prefix}-{index}"
    # The bad item is quarantined with its own text and its reason.
    [(_, quarantined)] = server.app.store.quarantined(0, 10)
    assert (quarantined.field, quarantined.reason) == (bad_field, "MISSING_FIELD")
    document = json.loads(payload)
    items = document if isinstance(document, list) else document["results"]
    assert json.loads(quarantined.raw) == items[1]
    assert quarantined.raw in payload


@pytest.mark.parametrize(
    ("payload", "reason", "fields", "field_reasons"),
    [
        pytest.param(
            '{"message_id": "m-1", "status": 2,', "INVALID_JSON", ["payload"], ["INVALID_JSON"], id="json"
        ),
        pytest.param('{"hello": "world"}', "UNKNOWN_FORMAT", ["payload"], ["UNKNOWN_FORMAT"], id="shape"),
        pytest.param(
            '{"results": {"messageId": "x"}}', "WRONG_TYPE", ["results"], ["WRONG_TYPE"], id="results"
        ),
        pytest.param(
            gms_payload({"status": 2}, {"message_id": "m-2"}, "not an object"),  # type: ignore[arg-type]
            "ALL_ITEMS_REJECTED",
            ["[0].message_id", "[1].status", "[2]"],
            ["MISSING_FIELD", "MISSING_FIELD", "WRONG_TYPE"],
            id="every-item",
        ),
        pytest.param(
            ssr_payload({"messageId": "x", "status": {"groupId": "three", "id": 5}}),
            "ALL_ITEMS_REJECTED",
            ["results[0].status.groupId"],
            ["WRONG_TYPE"],
            id="wrong-type",
        ),
    ],
)
async def test_a_wholly_invalid_request_is_invalid_argument_with_field_violations(
    server: Running, payload: str, reason: str, fields: list[str], field_reasons: list[str]
) -> None:
    details = await failure(server.stub.Ingest(IngestRequest(payload=payload)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == reason
    assert details.fields == fields
    assert details.field_reasons == field_reasons
    assert server.app.store.latest_cursor() == 0  # nothing stored
    assert server.app.store.quarantined(0, 10)  # but kept for a later look


async def test_invalid_json_says_where(server: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Ingest(IngestRequest(payload='{\n  "message_id": "m-1",\n  "status": 2,\n}'))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 4 column 1" in (raised.value.details() or "")


async def test_an_empty_request_is_missing_payload(server: Running) -> None:
    details = await failure(server.stub.Ingest(IngestRequest(request_id="r-1")))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "MISSING_PAYLOAD"
    assert details.fields == ["payload"]


# --- Ingest: idempotency and group commit --------------------------------------------------------


async def test_a_retried_request_id_gets_the_first_answer_and_nothing_twice(server: Running) -> None:
    payload = ssr_payload(ssr("m-1", "SENT", seconds=1), ssr("m-2", "DELIVERED", seconds=2))
    first = await ingest(server.stub, payload, request_id="req-1")
    assert [result.outcome for result in first.results] == [ACCEPTED, ACCEPTED]
    latest = server.app.store.latest_cursor()

    again = await ingest(server.stub, payload, request_id="req-1")
    assert again.replayed
    again.replayed = False
    assert again == first  # the same answer, cursors and all (not DUPLICATE)
    # Another body with the same id is refused (tests/test_request_ids.py): nothing is applied.
    details = await failure(
        server.stub.Ingest(IngestRequest(payload=ssr_payload(ssr("m-3")), request_id="req-1"))
    )
    assert (details.code, details.reason, details.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        ["request_id"],
    )
    assert server.app.store.latest_cursor() == latest
    assert [len(await history_of(server.stub, message_id)) for message_id in ("m-1", "m-2")] == [1, 1]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Fetch(FetchRequest(message_id="m-3"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    # Without the request id the same body is a new request: its items are duplicates.
    fresh = await ingest(server.stub, payload)
    assert [result.outcome for result in fresh.results] == [DUPLICATE, DUPLICATE]


async def test_concurrent_calls_with_one_request_id_are_applied_once(server: Running) -> None:
    payload = gms_payload(gms("m-1"), gms("m-2", "SENT"), gms("m-3", "EXPIRED"))
    responses = await asyncio.gather(*(ingest(server.stub, payload, request_id="same") for _ in range(8)))
    assert [response.replayed for response in responses].count(False) == 1
    first = next(response for response in responses if not response.replayed)
    for response in responses:
        response.replayed = False
    assert all(response == first for response in responses)
    assert [result.outcome for result in responses[0].results] == [ACCEPTED] * 3
    assert server.app.store.latest_cursor() == max(int(result.cursor) for result in responses[0].results)
    assert len(server.app.store.changes(0, 100)) == 3
    for message_id in ("m-1", "m-2", "m-3"):
        assert len(await history_of(server.stub, message_id)) == 1


async def test_many_concurrent_ingests_are_all_committed(server: Running) -> None:
    count = 200
    responses = await asyncio.gather(
        *(ingest(server.stub, gms_payload(gms(f"m-{number}", seconds=number))) for number in range(count))
    )
    assert all([result.outcome for result in response.results] == [ACCEPTED] for response in responses)
    cursors = [int(response.results[0].cursor) for response in responses]
    assert len(set(cursors)) == count
    assert server.app.store.latest_cursor() == max(cursors)
    states = await asyncio.gather(*(state_of(server.stub, f"m-{number}") for number in range(count)))
    assert [state.message_id for state in states] == [f"m-{number}" for number in range(count)]
    assert all(state.status == S.DELIVERY_STATUS_DELIVERED for state in states)
    # Each answer's cursor is the stored position of that message's report.
    stored = {change.report.message_id: change.cursor for change in server.app.store.changes(0, 1000)}
    assert stored == {f"m-{number}": cursor for number, cursor in enumerate(cursors)}


# --- Fetch ---------------------------------------------------------------------------------------


async def test_fetch_an_unknown_message_is_not_found(server: Running) -> None:
    await ingest(server.stub, gms_payload(gms("known")))
    details = await failure(server.stub.Fetch(FetchRequest(message_id="unknown")))
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.reason == "MESSAGE_NOT_FOUND"
    assert details.metadata == {"message_id": "unknown"}
    details = await failure(server.stub.Fetch(FetchRequest(message_id="known", source=SSR)))
    assert details.reason == "MESSAGE_NOT_FOUND"


async def test_fetch_by_message_id_with_history(server: Running) -> None:
    payloads = [
        gms_payload(gms("m-1", "SENT", seconds=1, reference="R")),
        gms_payload(gms("m-1", "DELIVERED", seconds=3)),
        gms_payload(gms("m-1", "SENT", seconds=2)),
    ]
    for payload in payloads:
        await ingest(server.stub, payload)
    await ingest(server.stub, ssr_payload(ssr("m-1", "EXPIRED", seconds=1)))  # the same id at another source

    plain = await fetch(server.stub, FetchRequest(message_id="m-1"))
    assert [(report.source, report.status) for report in plain.reports] == [
        (GMS, S.DELIVERY_STATUS_DELIVERED),
        (SSR, S.DELIVERY_STATUS_EXPIRED),
    ]
    assert list(plain.history) == []
    assert plain.reports[0].reference == "R"  # from the earlier report that had it

    with_history = await fetch(server.stub, FetchRequest(message_id="m-1", source=GMS, include_history=True))
    assert [report.source for report in with_history.reports] == [GMS]
    assert [report.raw_payload for report in with_history.history] == payloads  # stored order, verbatim
    assert [report.status for report in with_history.history] == [
        S.DELIVERY_STATUS_SENT,
        S.DELIVERY_STATUS_DELIVERED,
        S.DELIVERY_STATUS_SENT,
    ]


async def test_fetch_a_bulk_page_by_page_while_reports_keep_arriving(server: Running) -> None:
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
            page = await fetch(server.stub, FetchRequest(bulk_id="BULK", page_size=3, page_token=token))
            pages += 1
            assert len(page.reports) <= 3
            assert all(report.bulk_id == "BULK" for report in page.reports)
            seen += [report.message_id for report in page.reports]
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


async def test_fetch_a_bulk_counts_statuses_across_the_whole_bulk(server: Running) -> None:
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
        page = await fetch(server.stub, FetchRequest(bulk_id="B", page_size=2, page_token=token))
        assert [(count.status, count.count) for count in page.status_counts] == expected
        assert page.total_size == len(names)
        seen += [report.message_id for report in page.reports]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == [f"m-{number}" for number in range(len(names))]

    empty = await fetch(server.stub, FetchRequest(bulk_id="unknown"))
    assert (list(empty.reports), empty.next_page_token, empty.total_size, list(empty.status_counts)) == (
        [],
        "",
        0,
        [],
    )


async def test_fetch_page_size_defaults_to_100_and_is_capped_at_1000(server: Running) -> None:
    await ingest(server.stub, ssr_payload(*(ssr(f"m-{number:04}", bulk_id="BIG") for number in range(1001))))
    default = await fetch(server.stub, FetchRequest(bulk_id="BIG"))
    assert len(default.reports) == 100
    assert default.next_page_token
    capped = await fetch(server.stub, FetchRequest(bulk_id="BIG", page_size=5000))
    assert len(capped.reports) == 1000
    last = await fetch(
        server.stub, FetchRequest(bulk_id="BIG", page_size=5000, page_token=capped.next_page_token)
    )
    assert [report.message_id for report in last.reports] == ["m-1000"]
    assert last.next_page_token == ""
    assert last.total_size == 1001


async def test_fetch_by_reference(server: Running) -> None:
    await ingest(
        server.stub, gms_payload(gms("g-1", reference="REF-1"), gms("g-2", "SENT", reference="REF-2"))
    )
    await ingest(server.stub, ssr_payload(ssr("s-1", "EXPIRED", reference="REF-1")))
    await ingest(server.stub, gms_payload(gms("g-3", "UNDELIVERED", reference="REF-1")))

    both = await fetch(server.stub, FetchRequest(reference="REF-1"))
    assert [(report.source, report.message_id) for report in both.reports] == [
        (GMS, "g-1"),
        (SSR, "s-1"),
        (GMS, "g-3"),
    ]
    assert both.total_size == 3
    assert list(both.status_counts) == []  # counts are for bulks
    gms_only = await fetch(server.stub, FetchRequest(reference="REF-1", source=GMS, page_size=1))
    assert [report.message_id for report in gms_only.reports] == ["g-1"]
    assert gms_only.total_size == 2
    rest = await fetch(
        server.stub,
        FetchRequest(reference="REF-1", source=GMS, page_size=1, page_token=gms_only.next_page_token),
    )
    assert [report.message_id for report in rest.reports] == ["g-3"]
    assert rest.next_page_token == ""

    unknown = await fetch(server.stub, FetchRequest(reference="nobody"))
    assert (list(unknown.reports), unknown.total_size) == ([], 0)


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
    ],
)
async def test_fetch_with_a_bad_page_token(server: Running, token: str) -> None:
    await ingest(server.stub, ssr_payload(*(ssr(f"m-{number}", bulk_id="B") for number in range(3))))
    details = await failure(server.stub.Fetch(FetchRequest(bulk_id="B", page_size=1, page_token=token)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_PAGE_TOKEN"
    assert details.fields == ["page_token"]


async def test_fetch_with_a_page_token_of_another_request(server: Running) -> None:
    await ingest(
        server.stub,
        ssr_payload(*(ssr(f"m-{number}", bulk_id="A", reference="A") for number in range(3))),
    )
    await ingest(server.stub, ssr_payload(*(ssr(f"n-{number}", bulk_id="B") for number in range(3))))
    first = await fetch(server.stub, FetchRequest(bulk_id="A", page_size=1))
    assert first.next_page_token
    for other in (
        FetchRequest(bulk_id="B", page_size=1, page_token=first.next_page_token),
        FetchRequest(reference="A", page_size=1, page_token=first.next_page_token),
        FetchRequest(bulk_id="A", source=SSR, page_size=1, page_token=first.next_page_token),
    ):
        details = await failure(server.stub.Fetch(other))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "PAGE_TOKEN_MISMATCH"
        assert details.fields == ["page_token"]
    # With its own request the token goes on where the first page ended.
    second = await fetch(
        server.stub, FetchRequest(bulk_id="A", page_size=1, page_token=first.next_page_token)
    )
    assert [report.message_id for report in second.reports] == ["m-1"]


@pytest.mark.parametrize(
    ("request_", "reason", "fields"),
    [
        pytest.param(
            FetchRequest(bulk_id="B", page_size=-1), "INVALID_PAGE_SIZE", ["page_size"], id="page-size"
        ),
        pytest.param(
            FetchRequest(reference="R", page_size=-100),
            "INVALID_PAGE_SIZE",
            ["page_size"],
            id="page-size-ref",
        ),
        pytest.param(FetchRequest(), "MISSING_SELECTOR", ["message_id"], id="no-selector"),
        pytest.param(FetchRequest(bulk_id=""), "EMPTY_SELECTOR", ["bulk_id"], id="empty-bulk-id"),
    ],
)
async def test_fetch_with_an_invalid_request(
    server: Running, request_: FetchRequest, reason: str, fields: list[str]
) -> None:
    details = await failure(server.stub.Fetch(request_))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == reason
    assert details.fields == fields


# --- Stream --------------------------------------------------------------------------------------


async def test_stream_by_default_starts_with_new_changes(server: Running) -> None:
    old = await ingest_each(server.stub, gms("old-1"), gms("old-2"))
    async with streaming(server.stub, StreamRequest(), start=old[-1]) as call:
        cursors = await ingest_each(server.stub, gms("new-1"), ssr("new-2"))
        changes = await read_changes(call, 2)
    assert cursors_of(changes) == cursors
    assert [change.report.message_id for change in changes] == ["new-1", "new-2"]
    assert [change.state.message_id for change in changes] == ["new-1", "new-2"]


async def test_stream_from_the_beginning_replays_then_goes_live(server: Running) -> None:
    stored = await ingest_each(
        server.stub, ssr("m-1", "SENT", seconds=1), ssr("m-1", "DELIVERED", seconds=2), gms("m-2")
    )
    async with streaming(server.stub, StreamRequest(from_beginning=True), start=0) as call:
        replayed = await read_changes(call, 3)
        assert cursors_of(replayed) == stored
        # Each change carries the report and the state right after it.
        assert [(change.report.status, change.state.status) for change in replayed[:2]] == [
            (S.DELIVERY_STATUS_SENT, S.DELIVERY_STATUS_SENT),
            (S.DELIVERY_STATUS_DELIVERED, S.DELIVERY_STATUS_DELIVERED),
        ]
        assert replayed[0].report.raw_payload == json.dumps(ssr("m-1", "SENT", seconds=1))
        live = await ingest_each(server.stub, ssr("m-1", "SENT", seconds=0), gms("m-3"))
        changes = await read_changes(call, 2)
    assert cursors_of(changes) == live
    assert (changes[0].report.status, changes[0].state.status) == (
        S.DELIVERY_STATUS_SENT,
        S.DELIVERY_STATUS_DELIVERED,
    )


async def test_stream_resumes_after_a_cursor_with_no_gap_and_no_duplicate(server: Running) -> None:
    before = await ingest_each(server.stub, *(gms(f"a-{number}") for number in range(10)))
    async with streaming(server.stub, StreamRequest(from_beginning=True), start=0) as call:
        first = await read_changes(call, 5)
    assert cursors_of(first) == before[:5]

    between = await ingest_each(server.stub, *(gms(f"b-{number}") for number in range(5)))

    during: list[int] = []

    async def keep_ingesting() -> None:
        for number in range(25):
            during.extend(await ingest_each(server.stub, ssr(f"c-{number}", bulk_id="C")))

    async with streaming(server.stub, StreamRequest(cursor=first[-1].cursor), start=before[4]) as call:
        writer = asyncio.create_task(keep_ingesting())
        try:
            rest = await read_changes(call, 5 + 5 + 25)
        finally:
            await writer
    assert cursors_of(first) + cursors_of(rest) == before + between + during


async def test_stream_replays_a_long_history_while_reports_arrive(server: Running) -> None:
    # More than one replay batch (and more than the transport buffers) is stored. Reports committed
    # while the replay is under way are published live and also read from the store by a later
    # replay batch: each must be delivered once.
    response = await ingest(server.stub, ssr_payload(*(ssr(f"old-{number}") for number in range(1500))))
    stored = [int(result.cursor) for result in response.results]
    async with streaming(server.stub, StreamRequest(from_beginning=True), start=0) as call:
        first = await read_changes(call, 1)
        during = await ingest_each(server.stub, *(gms(f"new-{number}") for number in range(40)))
        rest = await read_changes(call, len(stored) + len(during) - 1)
        later = await ingest_each(server.stub, gms("live"))
        assert cursors_of(await read_changes(call, 1)) == later
    assert cursors_of(first + rest) == stored + during


async def test_whatever_the_stream_shows_fetch_finds(server: Running) -> None:
    async def keep_ingesting() -> None:
        for number in range(10):
            await asyncio.gather(
                *(
                    ingest(server.stub, ssr_payload(ssr(f"m-{number}-{part}", bulk_id="B")))
                    for part in range(5)
                )
            )

    async with streaming(server.stub, StreamRequest(), start=0) as call:
        writer = asyncio.create_task(keep_ingesting())
        try:
            seen: list[str] = []
            async with asyncio.timeout(TIMEOUT):
                while len(seen) < 50:
                    [change] = await read_changes(call, 1)
                    # Fetched at once, while later reports are still being committed.
                    found = await fetch(server.stub, FetchRequest(message_id=change.report.message_id))
                    assert [report.message_id for report in found.reports] == [change.report.message_id]
                    history = await history_of(server.stub, change.report.message_id)
                    assert change.report in history
                    seen.append(change.report.message_id)
        finally:
            await writer
    assert sorted(seen) == sorted(f"m-{number}-{part}" for number in range(10) for part in range(5))


# The dataset of the filter tests, in the order ingested.
FILTER_DATA: list[dict[str, object]] = [
    ssr("ssr-1", "DELIVERED", bulk_id="B1"),
    ssr("ssr-2", "SENT", bulk_id="B1", channel="VIBER"),
    ssr("ssr-3", "EXPIRED", bulk_id="B2"),
    gms("gms-1", "DELIVERED"),
    gms("gms-2", "UNDELIVERED", sent_via="viber"),
    gms("gms-3", "SENT", sent_via="whatsapp"),
    gms("gms-1", "SENT", seconds=-10),  # late: the report is SENT, the state stays DELIVERED
    ssr("ssr-2", "SEEN", seconds=60, channel="VIBER"),  # no bulk id: still in bulk B1
]


@pytest.mark.parametrize(
    ("request_", "expected", "sentinel"),
    [
        pytest.param(
            StreamRequest(bulk_id="B1"),
            ["ssr-1", "ssr-2", "ssr-2"],
            ssr("sentinel", bulk_id="B1"),
            id="bulk_id",
        ),
        pytest.param(
            StreamRequest(message_ids=["ssr-3", "gms-2", "sentinel"]),
            ["ssr-3", "gms-2"],
            gms("sentinel"),
            id="message_ids",
        ),
        pytest.param(
            StreamRequest(statuses=[S.DELIVERY_STATUS_DELIVERED, S.DELIVERY_STATUS_SEEN]),
            ["ssr-1", "gms-1", "ssr-2"],
            gms("sentinel"),
            id="statuses",
        ),
        pytest.param(
            StreamRequest(statuses=[S.DELIVERY_STATUS_SENT]),
            ["ssr-2", "gms-3", "gms-1"],
            gms("sentinel", "SENT"),
            id="report-status",
        ),
        pytest.param(
            StreamRequest(channels=[Channel.CHANNEL_VIBER]),
            ["ssr-2", "gms-2", "ssr-2"],
            gms("sentinel", sent_via="viber"),
            id="channels",
        ),
        pytest.param(
            StreamRequest(source=GMS),
            ["gms-1", "gms-2", "gms-3", "gms-1"],
            gms("sentinel"),
            id="source",
        ),
        pytest.param(
            StreamRequest(bulk_id="B1", statuses=[S.DELIVERY_STATUS_SENT, S.DELIVERY_STATUS_SEEN]),
            ["ssr-2", "ssr-2"],
            ssr("sentinel", "SENT", bulk_id="B1"),
            id="combined",
        ),
    ],
)
async def test_stream_filters(
    server: Running, request_: StreamRequest, expected: list[str], sentinel: dict[str, object]
) -> None:
    # Half stored before the stream starts (replayed), half while it is live.
    await ingest_each(server.stub, *FILTER_DATA[:3])
    request = StreamRequest()
    request.CopyFrom(request_)
    request.from_beginning = True
    async with streaming(server.stub, request, start=0) as call:
        await ingest_each(server.stub, *FILTER_DATA[3:], sentinel)
        changes: list[StreamResponse] = []
        async with asyncio.timeout(TIMEOUT):
            while not changes or changes[-1].report.message_id != "sentinel":
                changes += await read_changes(call, 1)
    assert [change.report.message_id for change in changes[:-1]] == expected
    assert cursors_of(changes) == sorted(cursors_of(changes))


@pytest.mark.parametrize("start", ["default", "from-beginning", "cursor", "nothing-matches"])
async def test_stream_starts_with_a_heartbeat_at_the_start_position(server: Running, start: str) -> None:
    cursors = await ingest_each(server.stub, gms("m-1"), gms("m-2"), gms("m-3"))
    request, position = {
        "default": (StreamRequest(), cursors[-1]),
        "from-beginning": (StreamRequest(from_beginning=True), 0),
        "cursor": (StreamRequest(cursor=str(cursors[1])), cursors[1]),
        "nothing-matches": (StreamRequest(bulk_id="no-such-bulk"), cursors[-1]),
    }[start]
    call = server.stub.Stream(request)
    try:
        # At once, not after heartbeat_seconds (15 s by default).
        assert await asyncio.wait_for(read_start(call), 3) == position
    finally:
        call.cancel()


async def test_stream_heartbeats_carry_the_latest_cursor(server: Running) -> None:
    request = StreamRequest(bulk_id="no-such-bulk", heartbeat_seconds=1)
    async with streaming(server.stub, request, start=0) as call:
        [latest] = await ingest_each(server.stub, ssr("m-1", bulk_id="other"))

        async def heartbeat_at(cursor: int) -> None:
            async with asyncio.timeout(4):
                while True:
                    message = await read_message(call)
                    assert message.heartbeat
                    assert not message.HasField("report")
                    assert not message.HasField("state")
                    assert int(message.cursor) <= cursor
                    if int(message.cursor) == cursor:
                        return

        await heartbeat_at(latest)
        [latest] = await ingest_each(server.stub, gms("m-2"))
        await heartbeat_at(latest)
        # A heartbeat's cursor is a place to resume from: nothing is lost after it.
        [following] = await ingest_each(server.stub, ssr("m-3", bulk_id="no-such-bulk"))
    async with streaming(server.stub, StreamRequest(cursor=str(latest)), start=latest) as resumed:
        assert cursors_of(await read_changes(resumed, 1)) == [following]


@pytest.mark.parametrize("cursor", ["abc", "-1", "", "1.5", " 1", "0x10", "1" * 20, "\u0661"])
async def test_stream_with_a_malformed_cursor(server: Running, cursor: str) -> None:
    await ingest_each(server.stub, gms("m-1"))
    details = await stream_failure(server.stub.Stream(StreamRequest(cursor=cursor)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_CURSOR"
    assert details.fields == ["cursor"]


async def test_stream_with_a_cursor_ahead_of_the_latest(server: Running) -> None:
    [latest] = await ingest_each(server.stub, gms("m-1"))
    details = await stream_failure(server.stub.Stream(StreamRequest(cursor=str(latest + 1))))
    assert details.code == grpc.StatusCode.OUT_OF_RANGE
    assert details.reason == "CURSOR_AHEAD"
    assert details.metadata["latest_cursor"] == str(latest)
    # The latest cursor itself is fine: the stream goes on from there.
    async with streaming(server.stub, StreamRequest(cursor=str(latest)), start=latest) as call:
        [following] = await ingest_each(server.stub, gms("m-2"))
        assert cursors_of(await read_changes(call, 1)) == [following]


async def test_stream_with_a_negative_heartbeat(server: Running) -> None:
    details = await stream_failure(server.stub.Stream(StreamRequest(heartbeat_seconds=-1)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == ["heartbeat_seconds"]


async def test_a_slow_consumer_misses_nothing_and_blocks_no_ingest(db_path: Path, clock: FakeClock) -> None:
    async with (
        own_server(db_path, clock, stream_buffer=8) as own,
        streaming(own.stub, StreamRequest(), start=0) as idle,
        streaming(own.stub, StreamRequest(), start=0) as reader,
    ):
        cursors: list[int] = []
        read_meanwhile: list[StreamResponse] = []
        for batch in range(20):
            # Each batch publishes 25 changes at once: more than the buffer of 8.
            response = await ingest(
                own.stub, ssr_payload(*(ssr(f"m-{batch}-{number}", bulk_id="B") for number in range(25)))
            )
            assert response.accepted_count == 25
            cursors += [int(result.cursor) for result in response.results]
            if batch % 5 == 4:  # the second consumer reads a little, now and then
                read_meanwhile += await read_changes(reader, 10)
        # Ingest went on although the first consumer has read nothing; now it reads everything.
        everything = await read_changes(idle, len(cursors), within=20)
        assert cursors_of(everything) == cursors
        rest = await read_changes(reader, len(cursors) - len(read_meanwhile), within=20)
        assert cursors_of(read_meanwhile + rest) == cursors
        # And both are live afterwards.
        [last] = await ingest_each(own.stub, gms("after"))
        assert cursors_of(await read_changes(idle, 1)) == [last]
        assert cursors_of(await read_changes(reader, 1)) == [last]


async def test_graceful_shutdown_ends_streams_and_keeps_what_was_acknowledged(
    db_path: Path, clock: FakeClock
) -> None:
    async with own_server(db_path, clock) as own, streaming(own.stub, StreamRequest(), start=0) as call:
        [cursor] = await ingest_each(own.stub, gms("before-stop"))
        assert cursors_of(await read_changes(call, 1)) == [cursor]

        async def ingest_one(number: int) -> IngestResponse | None:
            try:
                return await ingest(own.stub, gms_payload(gms(f"racing-{number}")))
            except grpc.aio.AioRpcError:
                return None

        racing = [asyncio.create_task(ingest_one(number)) for number in range(20)]
        await asyncio.sleep(0)
        await asyncio.wait_for(own.stop(), TIMEOUT)

        # The stream ended cleanly: OK, after at most the changes committed before it closed.
        async with asyncio.timeout(TIMEOUT):
            while isinstance(message := await call.read(), StreamResponse):
                assert message.heartbeat or message.report.message_id.startswith("racing-")
        assert await call.code() == grpc.StatusCode.OK
        answers = await asyncio.gather(*racing)

    acknowledged = ["before-stop"] + [
        f"racing-{number}" for number, answer in enumerate(answers) if answer is not None
    ]
    assert all(answer is None or answer.accepted_count == 1 for answer in answers)
    store = SqliteStore(db_path)
    try:
        for message_id in acknowledged:
            assert [state.message_id for state in store.messages(message_id)] == [message_id]
    finally:
        store.close()


async def test_a_stream_opened_while_shutting_down_is_refused_at_once(
    db_path: Path, clock: FakeClock
) -> None:
    async with own_server(db_path, clock) as own:
        open_before = own.stub.Stream(StreamRequest())
        assert await read_start(open_before) == 0
        own.app.hub.close()  # the first step of App.stop that ends streams; the server still serves
        ended = await asyncio.wait_for(open_before.read(), TIMEOUT)
        assert not isinstance(ended, StreamResponse)  # the end of the stream
        assert await open_before.code() == grpc.StatusCode.OK
        # Refused at once, instead of held open until the server's grace period ends.
        for call in (
            own.stub.Stream(StreamRequest(from_beginning=True)),
            own.stub.StreamBatches(StreamBatchesRequest()),
        ):
            refused = await failure(call.read())
            assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        # Other calls are still answered until the server stops.
        [cursor] = await ingest_each(own.stub, gms("while-stopping"))
        assert cursor > 0


async def test_a_stream_catching_up_stops_at_shutdown(server: Running) -> None:
    for first in range(0, 1200, 400):
        response = await ingest(
            server.stub, gms_payload(*(gms(f"backlog-{n}") for n in range(first, first + 400)))
        )
        assert response.accepted_count == 400
    running = server.app
    loop = asyncio.get_running_loop()

    def read(call: Any) -> Any:
        return loop.run_in_executor(running.reads, call)

    feed = cast(
        AsyncGenerator[list[Change] | Heartbeat, None],
        follow_batches(running.store, running.hub, read, ChangeFilter(), 0, 15, max_batch=500),
    )
    try:
        assert await anext(feed) == Heartbeat(0)
        first_batch = await anext(feed)
        assert isinstance(first_batch, list)
        assert len(first_batch) == 500
        running.hub.close()  # shutdown, with 700 changes still to replay
        assert [item async for item in feed] == []
    finally:
        await feed.aclose()


# StreamBatches: Stream's feed, with the changes ready together in one message.


async def read_batch(call: BatchCall) -> list[StreamResponse]:
    message = await asyncio.wait_for(call.read(), TIMEOUT)
    assert isinstance(message, StreamBatchesResponse), "the stream ended"
    assert message.responses, "a batch is never empty"
    return list(message.responses)


async def test_stream_batches_carries_stream_s_feed_in_order(server: Running) -> None:
    stored = await ingest_each(server.stub, *(gms(f"batched-{n}") for n in range(3)))
    batches = server.stub.StreamBatches(StreamBatchesRequest(stream=StreamRequest(from_beginning=True)))
    singles = server.stub.Stream(StreamRequest(from_beginning=True))
    try:
        [start] = await read_batch(batches)  # the start heartbeat travels alone
        assert start.heartbeat
        assert start.cursor == "0"
        assert await read_start(singles) == 0
        live = await ingest_each(server.stub, *(gms(f"batched-{n}", "SENT") for n in range(3, 5)))
        got: list[StreamResponse] = []
        while len(got) < 5:
            got += await read_batch(batches)
        assert cursors_of(got) == stored + live
        assert got == await read_changes(singles, 5)  # the same messages, byte for byte
    finally:
        batches.cancel()
        singles.cancel()


async def test_changes_committed_together_arrive_in_one_message(server: Running) -> None:
    call = server.stub.StreamBatches(StreamBatchesRequest())
    try:
        [start] = await read_batch(call)
        assert start.heartbeat
        response = await ingest(server.stub, gms_payload(*(gms(f"together-{n}") for n in range(50))))
        assert response.accepted_count == 50
        # One Ingest is one commit, published at once: the waiting subscriber sends it whole.
        batch = await read_batch(call)
        assert [change.report.message_id for change in batch] == [f"together-{n}" for n in range(50)]
        assert cursors_of(batch) == [int(result.cursor) for result in response.results]
    finally:
        call.cancel()


async def test_stream_batches_catches_up_in_bounded_batches(server: Running) -> None:
    for first in range(0, 1200, 400):
        await ingest(server.stub, gms_payload(*(gms(f"backlog-{n}") for n in range(first, first + 400))))
    call = server.stub.StreamBatches(StreamBatchesRequest(stream=StreamRequest(from_beginning=True)))
    try:
        await read_batch(call)
        sizes: list[int] = []
        got: list[StreamResponse] = []
        while len(got) < 1200:
            batch = await read_batch(call)
            sizes.append(len(batch))
            got += batch
        assert [change.report.message_id for change in got] == [f"backlog-{n}" for n in range(1200)]
        assert max(sizes) <= 500  # read from the store 500 at a time
        assert len(sizes) >= 3
    finally:
        call.cancel()


async def test_a_stream_batches_consumer_that_falls_behind_catches_up_with_nothing_lost(
    db_path: Path, clock: FakeClock
) -> None:
    async with own_server(db_path, clock, stream_buffer=8) as own:
        call = own.stub.StreamBatches(StreamBatchesRequest())
        try:
            [start] = await read_batch(call)
            assert start.heartbeat
            cursors: list[int] = []
            for batch in range(10):
                # Each commit publishes 30 changes at once: more than the buffer of 8, so the
                # subscriber overflows and reads them from the store instead.
                response = await ingest(own.stub, ssr_payload(*(ssr(f"f-{batch}-{n}") for n in range(30))))
                cursors += [int(result.cursor) for result in response.results]
            assert own.app.hub.overflows >= 1
            got: list[StreamResponse] = []
            while len(got) < len(cursors):
                got += await read_batch(call)
            assert cursors_of(got) == cursors  # every change once, in order
            [last] = await ingest_each(own.stub, gms("after"))  # and live again afterwards
            assert cursors_of(await read_batch(call)) == [last]
        finally:
            call.cancel()


async def test_stream_batches_names_the_field_inside_the_stream_request(server: Running) -> None:
    request = StreamBatchesRequest(stream=StreamRequest(heartbeat_seconds=-1))
    details = await failure(server.stub.StreamBatches(request).read())
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == ["stream.heartbeat_seconds"]


# Stream encoding: one change, encoded once for every subscriber.


def test_a_change_is_encoded_once_and_decodes_to_its_stream_response() -> None:
    report = DeliveryReport(message_id="m-1", status=DeliveryStatus.DELIVERY_STATUS_DELIVERED)
    state = DeliveryReport(message_id="m-1", bulk_id="b-1", status=DeliveryStatus.DELIVERY_STATUS_DELIVERED)
    encode = StreamEncoder(size=2)
    [first] = encode.batches([Change(7, report, state)])
    [second] = encode.batches([Change(7, report, state)])
    assert second is first  # a second subscriber gets the same bytes
    expected = StreamResponse(cursor="7", report=report, state=state)
    assert StreamBatchesResponse.FromString(first) == StreamBatchesResponse(responses=[expected])
    single = encode.response(Change(7, report, state))
    assert StreamResponse.FromString(single) == expected
    assert encode.response(Change(7, report, state)) is single  # Stream subscribers share bytes too

    list(encode.batches([Change(8, report, state), Change(9, report, state)]))
    # Over the size: the oldest (7) was dropped, and is encoded again on demand.
    [again] = encode.batches([Change(7, report, state)])
    assert again is not first
    assert again == first


@given(
    texts=st.lists(st.text(max_size=300), min_size=1, max_size=40),
    limit=st.integers(min_value=1, max_value=4000),
)
def test_a_batch_is_its_changes_in_order_split_at_the_byte_limit(texts: list[str], limit: int) -> None:
    changes = [
        Change(cursor, DeliveryReport(message_id=f"m-{cursor}", reference=text), DeliveryReport())
        for cursor, text in enumerate(texts, start=1)
    ]
    batches = list(StreamEncoder(size=100).batches(changes, max_bytes=limit))
    decoded = [StreamBatchesResponse.FromString(batch).responses for batch in batches]
    assert [response.cursor for batch in decoded for response in batch] == [str(c.cursor) for c in changes]
    assert [response.report for batch in decoded for response in batch] == [c.report for c in changes]
    for batch, responses in zip(batches, decoded, strict=True):
        # Over the limit only when one change alone is bigger than it.
        assert len(batch) <= limit or len(responses) == 1


def test_buffer_overflows_are_counted_once_each_and_stay_counted_after_the_subscriber_leaves() -> None:
    hub = Hub(capacity=2)
    slow = hub.subscribe(ChangeFilter())
    report = DeliveryReport(message_id="m-1")
    hub.publish(Change(cursor, report, report) for cursor in range(1, 6))  # overflows at the third
    assert slow.overflowed
    assert hub.overflows == 1  # once per fall-behind, not per change offered while behind
    hub.unsubscribe(slow)
    assert hub.overflows == 1
