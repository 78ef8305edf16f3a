"""The Python client (dlrhub_client) against the real server: in-process, and as a restarted subprocess."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

import dlrhub_client
from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    IngestResponse,
    StreamChange,
    StreamHeartbeat,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.provider_formats_pb2 import (
    GmsReport,
    SentSmsReport,
    SentSmsReportPrice,
    SentSmsReportStatus,
)
from dlrhub_client import (
    AsyncClient,
    Channel,
    Client,
    DeliveryStatus,
    DlrhubClientError,
    FieldViolation,
    Format,
    IngestOutcome,
    IngestResponseView,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    Source,
    TlsConfig,
    UnavailableError,
)
from tests.conftest import Running
from tests.helpers import PROCESS_TIMEOUT, TIMEOUT, eventually, gms_bare
from tools import launcher

T = TypeVar("T")
ACCEPTED = IngestOutcome.INGEST_OUTCOME_ACCEPTED
DUPLICATE = IngestOutcome.INGEST_OUTCOME_DUPLICATE


def sent_sms(message_id: str, bulk_id: str, *, group_id: int = 3, status_id: int = 5) -> dict[str, Any]:
    """A SentSMSReport report as the provider spells it (camelCase)."""
    return {
        "bulkId": bulk_id,
        "messageId": message_id,
        "to": "41793026727",
        "doneAt": "2019-11-09T16:00:00.000+0000",
        "smsCount": 1,
        "callbackData": f"ref-{bulk_id}",
        "price": {"pricePerMessage": "0.01", "currency": "EUR"},
        "status": {
            "groupId": group_id,
            "groupName": "DELIVERED",
            "id": status_id,
            "name": "DELIVERED_TO_HANDSET",
        },
    }


def closed_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def generator(stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """The stream as the async generator it is, so a test can close it."""
    assert isinstance(stream, AsyncGenerator)
    return stream


async def take(stream: AsyncIterator[T], count: int) -> list[T]:
    """The first `count` items of a stream (bounded by PROCESS_TIMEOUT), then the stream closed."""
    items: list[T] = []
    closable = generator(stream)

    async def collect() -> None:
        async for item in closable:
            items.append(item)
            if len(items) == count:
                return

    try:
        await asyncio.wait_for(collect(), PROCESS_TIMEOUT)
    finally:
        await closable.aclose()
    return items


@pytest.fixture
async def client(server: Running) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address, timeout=10) as async_client:
        yield async_client


FULL = IngestResponseView.INGEST_RESPONSE_VIEW_FULL


# Ingest.


async def test_ingest_payload_text_and_bytes_with_detected_and_explicit_format(client: AsyncClient) -> None:
    text = json.dumps([gms_bare("text-1", extra_id="REF-T"), gms_bare("text-2", status=3, substatus=35)])
    response = await client.ingest(text, view=FULL)
    assert [r.outcome for r in response.results] == [ACCEPTED, ACCEPTED]
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (2, 0, 0)
    assert [r.report.source for r in response.results] == [Source.SOURCE_GMS] * 2
    assert [r.report.status for r in response.results] == [
        DeliveryStatus.DELIVERY_STATUS_DELIVERED,
        DeliveryStatus.DELIVERY_STATUS_UNDELIVERED,
    ]
    assert response.results[0].report.raw_payload == ""  # the answer does not echo the text back
    stored = (await client.get_message("text-1")).messages[0]
    assert stored.raw_payload == json.dumps(gms_bare("text-1", extra_id="REF-T"))

    again = await client.ingest(text.encode("utf-8"))  # the BASIC view: outcomes and ids, no reports
    assert [(r.outcome, r.message_id) for r in again.results] == [
        (DUPLICATE, "text-1"),
        (DUPLICATE, "text-2"),
    ]
    assert not any(r.HasField("report") for r in again.results)

    body = json.dumps({"results": [sent_sms("bytes-1", "B-bytes")]}).encode("utf-8")
    explicit = await client.ingest(body, format=Format.FORMAT_SENT_SMS_REPORT, view=FULL)
    assert explicit.results[0].outcome == ACCEPTED
    assert explicit.results[0].report.source == Source.SOURCE_SENT_SMS_REPORT
    assert explicit.results[0].report.bulk_id == "B-bytes"

    # The explicit format is sent: a GMS body read as SentSMSReport is not a SentSMSReport body.
    with pytest.raises(InvalidArgumentError):
        await client.ingest(json.dumps(gms_bare("wrong-format")), format=Format.FORMAT_SENT_SMS_REPORT)


async def test_ingest_request_id_answers_the_first_answer_again(client: AsyncClient) -> None:
    first = await client.ingest(json.dumps(gms_bare("rid-1")), request_id="req-1")
    retried = await client.ingest(json.dumps(gms_bare("rid-1")), request_id="req-1")
    assert retried.replayed
    retried.replayed = False
    assert retried == first
    assert retried.results[0].outcome == ACCEPTED


async def test_ingest_gms_from_dicts_with_the_providers_names_and_typed_messages(client: AsyncClient) -> None:
    from_dicts = await client.ingest_gms(
        [
            gms_bare(
                "gms-dict-1",
                number="380961111111",
                substatus=23,
                hyber_status=23011,
                extra_id="AD-1",
                sent_via="viber",
            ),
            gms_bare("gms-dict-2", status=3, substatus=35, sent_via="sms"),
        ],
        view=FULL,
    )
    assert [r.outcome for r in from_dicts.results] == [ACCEPTED, ACCEPTED]
    first = from_dicts.results[0].report
    assert (first.message_id, first.recipient, first.reference) == ("gms-dict-1", "+380961111111", "AD-1")
    assert (first.status, first.channel) == (DeliveryStatus.DELIVERY_STATUS_DELIVERED, Channel.CHANNEL_VIBER)
    assert first.raw.gms.hyber_status == 23011
    assert from_dicts.results[1].report.status == DeliveryStatus.DELIVERY_STATUS_UNDELIVERED

    typed = await client.ingest_gms(
        [GmsReport(message_id="gms-typed-1", status=1, substatus=12, time=1_477_417_294_667, sent_via="sms")],
        request_id="typed-gms",
        view=FULL,
    )
    assert typed.results[0].outcome == ACCEPTED
    assert typed.results[0].report.status == DeliveryStatus.DELIVERY_STATUS_ACCEPTED
    assert typed.results[0].report.channel == Channel.CHANNEL_SMS

    # A dict and the equal typed message are the same report.
    duplicate = await client.ingest_gms(
        [GmsReport(message_id="gms-dict-2", status=3, substatus=35, sent_via="sms", time=1_477_417_294_667)]
    )
    assert duplicate.results[0].outcome == DUPLICATE


async def test_ingest_sent_sms_report_from_dicts_and_typed_messages(client: AsyncClient) -> None:
    from_dicts = await client.ingest_sent_sms_report([sent_sms("ssr-dict-1", "B-ssr")], view=FULL)
    report = from_dicts.results[0].report
    assert from_dicts.results[0].outcome == ACCEPTED
    assert (report.source, report.message_id, report.bulk_id) == (
        Source.SOURCE_SENT_SMS_REPORT,
        "ssr-dict-1",
        "B-ssr",
    )
    assert (report.reference, report.recipient) == ("ref-B-ssr", "+41793026727")
    assert report.status == DeliveryStatus.DELIVERY_STATUS_DELIVERED
    assert (report.price.amount, report.price.currency) == ("0.01", "EUR")

    typed = await client.ingest_sent_sms_report(
        [
            SentSmsReport(
                bulk_id="B-ssr",
                message_id="ssr-typed-1",
                to="41793026834",
                done_at="2019-11-09T17:00:00.000+0000",
                price=SentSmsReportPrice(price_per_message="0.02", currency="EUR"),
                status=SentSmsReportStatus(group_id=2, group_name="UNDELIVERABLE", id=9, name="X"),
            )
        ],
        view=FULL,
    )
    assert typed.results[0].outcome == ACCEPTED
    assert typed.results[0].report.status == DeliveryStatus.DELIVERY_STATUS_UNDELIVERED
    assert typed.results[0].report.bulk_id == "B-ssr"


async def test_dicts_go_as_the_providers_json_so_numbers_and_extra_fields_pass(client: AsyncClient) -> None:
    pulled = json.loads((Path(__file__).parent / "fixtures" / "sent_sms_report_pull.json").read_text())
    response = await client.ingest_sent_sms_report(pulled["results"], view=FULL)
    assert [r.outcome for r in response.results] == [ACCEPTED, ACCEPTED]
    assert response.results[0].report.price.amount == "0.01"  # a JSON number, kept exact
    gms: dict[str, Any] = {"number": 380961111111, "message_id": "gms-number", "status": 2, "clicks": 3}
    assert (await client.ingest_gms([gms], view=FULL)).results[0].report.recipient == "+380961111111"
    with pytest.raises(TypeError, match="not a mix"):
        await client.ingest_gms([gms, GmsReport(message_id="x", status=2)])  # type: ignore[arg-type]


# GetMessage and ListMessages.


async def test_fetch_by_message_id_reference_and_bulk_id(client: AsyncClient) -> None:
    await client.ingest_gms(
        [gms_bare("f-1", status=1, time_ms=1_000, extra_id="REF-F"), gms_bare("f-2", extra_id="REF-F")]
    )
    await client.ingest_gms([gms_bare("f-1", status=2, time_ms=2_000, extra_id="REF-F")])
    await client.ingest_sent_sms_report([sent_sms("f-3", "B-F"), sent_sms("f-4", "B-F")])

    one = await client.get_message("f-1", include_history=True)
    assert [r.message_id for r in one.messages] == ["f-1"]
    assert one.messages[0].status == DeliveryStatus.DELIVERY_STATUS_DELIVERED
    assert [r.status for r in one.history] == [
        DeliveryStatus.DELIVERY_STATUS_SENT,
        DeliveryStatus.DELIVERY_STATUS_DELIVERED,
    ]
    assert not (await client.get_message("f-1")).history

    by_reference = await client.list_messages(reference="REF-F")
    assert sorted(r.message_id for r in by_reference.messages) == ["f-1", "f-2"]
    assert by_reference.total_size == 2

    by_bulk = await client.list_messages(bulk_id="B-F")
    assert sorted(r.message_id for r in by_bulk.messages) == ["f-3", "f-4"]
    assert [(c.status, c.count) for c in by_bulk.status_counts] == [
        (DeliveryStatus.DELIVERY_STATUS_DELIVERED, 2)
    ]

    assert sorted([r.message_id async for r in client.iter_reference("REF-F", page_size=1)]) == ["f-1", "f-2"]
    other_source = await client.list_messages(reference="REF-F", source=Source.SOURCE_SENT_SMS_REPORT)
    assert not other_source.messages


async def test_iter_bulk_follows_page_tokens_over_several_pages(client: AsyncClient) -> None:
    ids = [f"page-{n}" for n in range(7)]
    await client.ingest_sent_sms_report([sent_sms(message_id, "B-PAGES") for message_id in ids])

    first_page = await client.list_messages(bulk_id="B-PAGES", page_size=3)
    assert len(first_page.messages) == 3
    assert first_page.next_page_token
    assert first_page.total_size == 7

    reports = [report async for report in client.iter_bulk("B-PAGES", page_size=3)]
    assert sorted(r.message_id for r in reports) == ids
    assert len(reports) == 7
    assert [r async for r in client.iter_bulk("NO-SUCH-BULK", page_size=3)] == []


@pytest.mark.parametrize(
    "selectors", [{}, {"reference": "r", "bulk_id": "b"}], ids=["none", "reference-and-bulk"]
)
async def test_list_messages_wants_exactly_one_selector(
    client: AsyncClient, selectors: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await client.list_messages(**selectors)


# Errors: the client's own classes, never grpc errors.


def assert_client_error(error: BaseException) -> None:
    assert isinstance(error, DlrhubClientError)
    assert grpc.RpcError not in type(error).__mro__
    assert error.__cause__ is None
    # No grpc error shows in the traceback either: raised `from None`, or outside any handler.
    assert error.__context__ is None or error.__suppress_context__


async def test_a_batch_of_only_bad_items_is_invalid_argument_with_field_violations(
    client: AsyncClient,
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await client.ingest(json.dumps([{"status": 2}, {"message_id": 5, "status": 2}]))
    error = caught.value
    assert_client_error(error)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "ALL_ITEMS_REJECTED"
    assert [(v.field, v.reason) for v in error.violations] == [
        ("[0].message_id", "MISSING_FIELD"),
        ("[1].message_id", "WRONG_TYPE"),
    ]
    assert all(isinstance(v, FieldViolation) and v.description for v in error.violations)
    assert "[0].message_id" in str(error)
    assert "ALL_ITEMS_REJECTED" in str(error)


async def test_invalid_json_is_invalid_argument_with_line_and_column(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await client.ingest('{"message_id": "x", "extra_id": AD-6640-7006"}')
    assert_client_error(caught.value)
    assert caught.value.reason == "INVALID_JSON"
    assert "line 1 column" in caught.value.violations[0].description


async def test_unknown_message_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_message("no-such-message")
    assert_client_error(caught.value)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "MESSAGE_NOT_FOUND"
    assert caught.value.metadata == {"message_id": "no-such-message"}


async def test_a_cursor_ahead_of_the_store_is_out_of_range(client: AsyncClient) -> None:
    await client.ingest(json.dumps(gms_bare("ahead-1")))
    with pytest.raises(OutOfRangeError) as caught:
        await take(client.stream(cursor="1000"), 1)
    assert_client_error(caught.value)
    assert caught.value.reason == "CURSOR_AHEAD"
    assert caught.value.metadata == {"cursor": "1000", "latest_cursor": "1"}

    with pytest.raises(InvalidArgumentError) as malformed:
        await take(client.stream(cursor="not-a-cursor"), 1)
    assert_client_error(malformed.value)
    assert malformed.value.reason == "INVALID_CURSOR"


async def test_nothing_listening_is_unavailable() -> None:
    async with AsyncClient(f"127.0.0.1:{closed_port()}", timeout=TIMEOUT) as client:
        # At once: a call that waited for the server would end DEADLINE_EXCEEDED at its deadline.
        with pytest.raises(UnavailableError) as caught:
            await client.get_message("x")
        assert_client_error(caught.value)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE

        with pytest.raises(UnavailableError) as ingest_caught:
            await client.ingest(json.dumps(gms_bare("x")))
        assert_client_error(ingest_caught.value)


async def test_stream_gives_up_after_reconnect_attempts_with_growing_backoff() -> None:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with AsyncClient(
        f"127.0.0.1:{closed_port()}", reconnect_attempts=3, reconnect_backoff=0.1, sleep=sleep
    ) as client:
        with pytest.raises(UnavailableError) as caught:
            await take(client.stream(from_beginning=True), 1)
    assert_client_error(caught.value)
    assert len(sleeps) == 3
    for attempt, seconds in enumerate(sleeps):
        ceiling = 0.1 * 2**attempt
        assert ceiling / 2 <= seconds <= ceiling


# Stream.


async def test_stream_falls_back_to_stream_on_a_server_without_stream_batches() -> None:
    """A server from before StreamBatches answers it UNIMPLEMENTED; the client follows Stream instead."""
    requests: list[StreamRequest] = []

    async def older_stream(request: StreamRequest, context: object) -> AsyncIterator[StreamResponse]:
        requests.append(request)
        yield StreamResponse(cursor="0", heartbeat=StreamHeartbeat())
        for cursor in (1, 2):
            change = StreamChange(report=DeliveryReport(message_id=f"old-{cursor}"))
            yield StreamResponse(cursor=str(cursor), change=change)
        await asyncio.Event().wait()  # live, with nothing more to send

    older = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(
        older_stream,
        request_deserializer=StreamRequest.FromString,
        response_serializer=StreamResponse.SerializeToString,
    )
    older.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "deliveryreport.v1.DeliveryReportService", {"Stream": handler}
            ),
        )
    )
    port = older.add_insecure_port("127.0.0.1:0")
    await older.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            changes = await take(client.stream(from_beginning=True), 2)
    finally:
        await older.stop(None)
    assert [message.change.report.message_id for message in changes] == ["old-1", "old-2"]
    assert [request.from_beginning for request in requests] == [True]  # one Stream call, no retries


async def test_stream_receives_changes_in_order_and_resumes_from_a_cursor(client: AsyncClient) -> None:
    live = generator(client.stream(include_heartbeats=True))
    try:
        start = await asyncio.wait_for(anext(live), PROCESS_TIMEOUT)
        assert start.HasField("heartbeat")
        assert not start.HasField("change")

        first = await client.ingest_gms([gms_bare("s-1"), gms_bare("s-2", status=1)])
        second = await client.ingest_gms(
            [gms_bare("s-3", status=3), gms_bare("s-2", status=2, time_ms=1_477_417_300_000)]
        )
        changes = [await asyncio.wait_for(anext(live), PROCESS_TIMEOUT) for _ in range(4)]
    finally:
        await live.aclose()

    cursors = [r.cursor for r in [*first.results, *second.results]]
    assert [c.cursor for c in changes] == cursors
    assert [int(c) for c in cursors] == sorted(int(c) for c in cursors)
    assert [c.change.report.message_id for c in changes] == ["s-1", "s-2", "s-3", "s-2"]
    assert not any(c.HasField("heartbeat") for c in changes)
    # The state is the message after the merge: s-2 went from SENT to DELIVERED.
    assert changes[1].change.state.status == DeliveryStatus.DELIVERY_STATUS_SENT
    assert changes[3].change.state.status == DeliveryStatus.DELIVERY_STATUS_DELIVERED

    resumed = await take(client.stream(cursor=cursors[1]), 2)
    assert [c.cursor for c in resumed] == cursors[2:]
    assert [c.change.report.message_id for c in resumed] == ["s-3", "s-2"]

    replayed = await take(client.stream(from_beginning=True), 4)
    assert [c.cursor for c in replayed] == cursors

    filtered = await take(
        client.stream(from_beginning=True, statuses=[DeliveryStatus.DELIVERY_STATUS_FAILED]), 1
    )
    assert [c.change.report.message_id for c in filtered] == ["s-3"]


async def test_closing_a_stream_ends_it_on_the_server(server: Running, client: AsyncClient) -> None:
    await client.ingest(json.dumps(gms_bare("close-1")))
    assert [c.change.report.message_id for c in await take(client.stream(from_beginning=True), 1)] == [
        "close-1"
    ]
    await eventually(lambda: server.app.hub.subscriber_count == 0)


# Reconnection, against the real `dlrhub serve` process restarted on the same port and database.


def serve(db: Path, port: int = 0) -> launcher.Server:
    return launcher.start(db, listen=f"127.0.0.1:{port}")


def stop(server: launcher.Server, how: str) -> None:
    """Stops it with SIGTERM ("terminate": a graceful exit) or SIGKILL ("kill"), within PROCESS_TIMEOUT s."""
    signum, exit_code = {"terminate": (signal.SIGTERM, 0), "kill": (signal.SIGKILL, -signal.SIGKILL)}[how]
    assert server.stop(signum, PROCESS_TIMEOUT) == exit_code


async def ingest_into(address: str, message_ids: list[str]) -> IngestResponse:
    """Ingests on a fresh connection to `address` (retrying while it comes up)."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    async with AsyncClient(address, timeout=5) as client:
        while True:
            try:
                return await client.ingest_gms([gms_bare(message_id) for message_id in message_ids])
            except UnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["terminate", "kill"])
async def test_stream_reconnects_after_a_restart_and_sees_every_change_once_in_order(
    tmp_path: Path, how: str
) -> None:
    db = tmp_path / "restart.db"
    first = serve(db)
    servers = [first]
    port = int(first.address.rsplit(":", 1)[1])
    batches = [["r-1", "r-2", "r-3"], ["r-4", "r-5"], ["r-6", "r-7", "r-8"]]
    expected = [message_id for batch in batches for message_id in batch]
    seen: list[StreamResponse] = []
    # Short channel-level reconnect backoff so the test does not wait on gRPC's 1 s default.
    channel = grpc.aio.insecure_channel(
        first.address,
        options=[
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 300),
        ],
    )
    consumer_client = AsyncClient(
        channel=channel, reconnect_attempts=200, reconnect_backoff=0.05, reconnect_backoff_max=0.2
    )

    async def consume() -> None:
        async for change in consumer_client.stream(from_beginning=True):
            seen.append(change)
            if len(seen) == len(expected):
                return

    consumer = asyncio.create_task(consume())
    try:
        ingested = [await ingest_into(first.address, batches[0])]
        await eventually(lambda: len(seen) == len(batches[0]) or consumer.done())
        await asyncio.to_thread(stop, first, how)

        # Stored while the consumer's server is down: only resuming from its cursor finds these.
        elsewhere = await asyncio.to_thread(serve, db)
        servers.append(elsewhere)
        ingested.append(await ingest_into(elsewhere.address, batches[1]))
        await asyncio.to_thread(stop, elsewhere, "terminate")

        restarted = await asyncio.to_thread(serve, db, port)
        servers.append(restarted)
        assert restarted.address == first.address
        ingested.append(await ingest_into(restarted.address, batches[2]))
        await asyncio.wait_for(asyncio.shield(consumer), PROCESS_TIMEOUT)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await consumer_client.close()
        for server in servers:
            await asyncio.to_thread(server.stop)

    assert [message.change.report.message_id for message in seen] == expected
    assert [change.cursor for change in seen] == [r.cursor for response in ingested for r in response.results]
    assert [int(change.cursor) for change in seen] == list(range(1, len(expected) + 1))
    assert not any(change.HasField("heartbeat") for change in seen)


# The blocking client.


def client_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "dlrhub-client")


def use_blocking_client(address: str) -> None:
    threads_before = client_threads()
    with Client(address, timeout=10) as client:
        assert client_threads() == threads_before + 1
        response = client.ingest(json.dumps([gms_bare("sync-1", extra_id="REF-SYNC"), gms_bare("sync-2")]))
        assert response.accepted_count == 2
        assert (
            client.ingest(json.dumps(gms_bare("sync-1", extra_id="REF-SYNC")).encode()).duplicate_count == 1
        )
        typed = client.ingest_gms([GmsReport(message_id="sync-3", status=2, time=1)])
        assert typed.results[0].outcome == ACCEPTED
        ssr = client.ingest_sent_sms_report([sent_sms(f"sync-bulk-{n}", "B-SYNC") for n in range(5)])
        assert ssr.accepted_count == 5

        assert [r.message_id for r in client.get_message("sync-1").messages] == ["sync-1"]
        assert [r.message_id for r in client.list_messages(reference="REF-SYNC").messages] == ["sync-1"]
        assert sorted(r.message_id for r in client.iter_bulk("B-SYNC", page_size=2)) == [
            f"sync-bulk-{n}" for n in range(5)
        ]
        assert [r.message_id for r in client.iter_reference("REF-SYNC", page_size=1)] == ["sync-1"]
        with pytest.raises(NotFoundError) as caught:
            client.get_message("sync-missing")
        assert_client_error(caught.value)
        with pytest.raises(ValueError, match="exactly one"):
            client.list_messages()

        received: list[str] = []
        for message in client.stream(from_beginning=True):
            received.append(message.change.report.message_id)
            if len(received) == 3:
                break
        assert received == ["sync-1", "sync-2", "sync-3"]
        # The client still works after a stream was abandoned.
        assert client.get_message("sync-3").messages[0].status == DeliveryStatus.DELIVERY_STATUS_DELIVERED
    assert client_threads() == threads_before  # closed: its loop thread is gone
    client.close()  # closing twice is harmless


async def test_blocking_client_makes_the_same_calls(server: Running) -> None:
    await asyncio.wait_for(asyncio.to_thread(use_blocking_client, server.address), PROCESS_TIMEOUT)
    await eventually(lambda: server.app.hub.subscriber_count == 0)


async def test_blocking_client_to_nothing_listening_raises_unavailable() -> None:
    def fetch() -> None:
        with Client(f"127.0.0.1:{closed_port()}", timeout=2) as client:
            client.get_message("x")

    with pytest.raises(UnavailableError) as caught:
        await asyncio.wait_for(asyncio.to_thread(fetch), PROCESS_TIMEOUT)
    assert_client_error(caught.value)


# TLS configuration and the public surface.


def test_tls_config_builds_channel_credentials(tmp_path: Path) -> None:
    assert isinstance(TlsConfig().credentials(), grpc.ChannelCredentials)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key, cert = tmp_path / "client.key", tmp_path / "client.pem"
    key.write_text("key")
    cert.write_text("cert")
    assert isinstance(TlsConfig(ca, cert, key).credentials(), grpc.ChannelCredentials)
    with pytest.raises(FileNotFoundError):
        TlsConfig(root_certificates=tmp_path / "missing.pem").credentials()
    with pytest.raises(FileNotFoundError):
        TlsConfig(ca, cert, tmp_path / "missing.key").credentials()


def test_public_names() -> None:
    assert set(dlrhub_client.__all__) == {
        "DEFAULT_TARGET",
        "AsyncClient",
        "Channel",
        "Client",
        "DeadlineExceededError",
        "DeliveryReport",
        "DeliveryStatus",
        "DlrhubClientError",
        "ErrorReason",
        "FieldViolation",
        "Format",
        "IngestOutcome",
        "IngestResponseView",
        "InvalidArgumentError",
        "NotFoundError",
        "OutOfRangeError",
        "PermissionDeniedError",
        "ResourceExhaustedError",
        "Source",
        "TlsConfig",
        "UnauthenticatedError",
        "UnavailableError",
    }
    exported = {name: getattr(dlrhub_client, name) for name in dlrhub_client.__all__}
    errors = {name: value for name, value in exported.items() if name.endswith("Error")}
    assert all(issubclass(value, DlrhubClientError) for value in errors.values())
    public = {name: getattr(dlrhub_client, name) for name in dir(dlrhub_client) if not name.startswith("_")}
    assert not [
        name
        for name, value in public.items()
        if value is grpc or (isinstance(value, type) and issubclass(value, grpc.RpcError))
    ]
    assert not any(issubclass(value, grpc.RpcError) for value in errors.values())
