"""Stream over gRPC: replay then live, cursors, filters, heartbeats, slow consumers, shutdown."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    StreamBatchesRequest,
    StreamRequest,
    StreamResponse,
)
from dlrhub.feed.encoding import EncodedChange
from dlrhub.feed.follow import FIRST_READ, Heartbeat, follow_batches
from dlrhub.feed.hub import Hub
from dlrhub.store import PostgresStore, SqliteStore
from dlrhub.store.base import Change, ChangeFilter
from tests.conftest import FakeClock, Running
from tests.helpers import (
    GMS,
    TIMEOUT,
    S,
    cursor_text,
    cursors_of,
    failure,
    get_message,
    gms,
    gms_payload,
    history_of,
    ingest,
    ingest_each,
    own_server,
    position,
    read_changes,
    read_message,
    read_start,
    ssr,
    ssr_payload,
    stream_failure,
    streaming,
)

if TYPE_CHECKING:
    pass


# Each test runs over SQLite and over PostgreSQL (conftest.py).
pytestmark = pytest.mark.engines
# --- Stream --------------------------------------------------------------------------------------


async def test_stream_by_default_starts_with_new_changes(server: Running) -> None:
    old = await ingest_each(server.stub, gms("old-1"), gms("old-2"))
    async with streaming(server.stub, StreamRequest(), start=old[-1]) as call:
        cursors = await ingest_each(server.stub, gms("new-1"), ssr("new-2"))
        changes = await read_changes(call, 2)
    assert cursors_of(changes) == cursors
    assert [message.change.report.message_id for message in changes] == ["new-1", "new-2"]
    assert [message.change.state.message_id for message in changes] == ["new-1", "new-2"]


async def test_stream_from_the_beginning_replays_then_goes_live(server: Running) -> None:
    stored = await ingest_each(
        server.stub, ssr("m-1", "SENT", seconds=1), ssr("m-1", "DELIVERED", seconds=2), gms("m-2")
    )
    async with streaming(server.stub, StreamRequest(from_beginning=True), start=0) as call:
        replayed = await read_changes(call, 3)
        assert cursors_of(replayed) == stored
        # Each change carries the report and the state right after it.
        assert [(message.change.report.status, message.change.state.status) for message in replayed[:2]] == [
            (S.DELIVERY_STATUS_SENT, S.DELIVERY_STATUS_SENT),
            (S.DELIVERY_STATUS_DELIVERED, S.DELIVERY_STATUS_DELIVERED),
        ]
        assert replayed[0].change.report.raw_payload == json.dumps(ssr("m-1", "SENT", seconds=1))
        live = await ingest_each(server.stub, ssr("m-1", "SENT", seconds=0), gms("m-3"))
        changes = await read_changes(call, 2)
    assert cursors_of(changes) == live
    assert (changes[0].change.report.status, changes[0].change.state.status) == (
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
    stored = [position(result.cursor) for result in response.results]
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
                    [message] = await read_changes(call, 1)
                    change = message.change
                    # Got at once, while later reports are still being committed.
                    found = await get_message(
                        server.stub, GetMessageRequest(message_id=change.report.message_id)
                    )
                    assert [report.message_id for report in found.messages] == [change.report.message_id]
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
            while not changes or changes[-1].change.report.message_id != "sentinel":
                changes += await read_changes(call, 1)
    assert [message.change.report.message_id for message in changes[:-1]] == expected
    assert cursors_of(changes) == sorted(cursors_of(changes))


@pytest.mark.parametrize("start", ["default", "from-beginning", "cursor", "nothing-matches"])
async def test_stream_starts_with_a_heartbeat_at_the_start_position(server: Running, start: str) -> None:
    cursors = await ingest_each(server.stub, gms("m-1"), gms("m-2"), gms("m-3"))
    request, position = {
        "default": (StreamRequest(), cursors[-1]),
        "from-beginning": (StreamRequest(from_beginning=True), 0),
        "cursor": (StreamRequest(cursor=cursor_text(server.app, cursors[1])), cursors[1]),
        "nothing-matches": (StreamRequest(bulk_id="no-such-bulk"), cursors[-1]),
    }[start]
    # At once: the periodic heartbeat would come an hour later.
    request.heartbeat_interval.FromSeconds(3600)
    call = server.stub.Stream(request)
    try:
        assert await read_start(call) == position
    finally:
        call.cancel()


async def test_stream_heartbeats_carry_the_latest_cursor(server: Running) -> None:
    request = StreamRequest(bulk_id="no-such-bulk", heartbeat_interval=Duration(seconds=1))
    async with streaming(server.stub, request, start=0) as call:
        [latest] = await ingest_each(server.stub, ssr("m-1", bulk_id="other"))

        async def heartbeat_at(cursor: int) -> None:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    message = await read_message(call)
                    assert message.HasField("heartbeat")
                    assert not message.HasField("change")
                    assert position(message.cursor) <= cursor
                    if position(message.cursor) == cursor:
                        return

        await heartbeat_at(latest)
        [latest] = await ingest_each(server.stub, gms("m-2"))
        await heartbeat_at(latest)
        # A heartbeat's cursor is a place to resume from: nothing is lost after it.
        [following] = await ingest_each(server.stub, ssr("m-3", bulk_id="no-such-bulk"))
    async with streaming(
        server.stub, StreamRequest(cursor=cursor_text(server.app, latest)), start=latest
    ) as resumed:
        assert cursors_of(await read_changes(resumed, 1)) == [following]


@pytest.mark.parametrize("cursor", ["abc", "-1", "", "1.5", " 1", "0x10", "1" * 20, "\u0661"])
async def test_stream_with_a_malformed_cursor(server: Running, cursor: str) -> None:
    await ingest_each(server.stub, gms("m-1"))
    details = await stream_failure(server.stub.Stream(StreamRequest(cursor=cursor)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_CURSOR"
    assert details.fields == ["cursor"]


async def test_stream_with_a_cursor_of_the_other_engine(server: Running) -> None:
    """SQLite's cursors are plain numbers, PostgreSQL's are not: a cursor kept from a dlrhub over the
    other engine is refused, never taken for a position in this history."""
    [latest] = await ingest_each(server.stub, gms("m-1"))
    mine = server.app.store.cursor_format
    [other] = {SqliteStore.cursor_format, PostgresStore.cursor_format} - {mine}
    details = await stream_failure(server.stub.Stream(StreamRequest(cursor=other.format(latest))))
    assert (details.code, details.reason, details.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CURSOR",
        ["cursor"],
    )


async def test_an_ingest_cursor_is_a_stream_position_at_once(server: Running) -> None:
    """What an Ingest answer's cursor promises (store/base.py, committed_cursor): the change is at
    that position of the Stream, and a Stream may resume after it as soon as the answer is given."""
    async with streaming(server.stub, StreamRequest(from_beginning=True), start=0) as before:
        response = await ingest(server.stub, gms_payload(gms("m-1"), gms("m-2")))
        async with streaming(
            server.stub,
            StreamRequest(cursor=response.results[0].cursor),
            start=position(response.results[0].cursor),
        ) as after:
            [later] = await ingest_each(server.stub, gms("m-3"))
            assert cursors_of(await read_changes(after, 2)) == [position(response.results[1].cursor), later]
        changes = await read_changes(before, 3)
        assert [change.cursor for change in changes[:2]] == [result.cursor for result in response.results]


async def test_stream_with_a_cursor_ahead_of_the_latest(server: Running) -> None:
    [latest] = await ingest_each(server.stub, gms("m-1"))
    details = await stream_failure(
        server.stub.Stream(StreamRequest(cursor=cursor_text(server.app, latest + 1)))
    )
    assert details.code == grpc.StatusCode.OUT_OF_RANGE
    assert details.reason == "CURSOR_AHEAD"
    assert details.metadata["latest_cursor"] == cursor_text(server.app, latest)
    # The latest cursor itself is fine: the stream goes on from there.
    async with streaming(
        server.stub, StreamRequest(cursor=cursor_text(server.app, latest)), start=latest
    ) as call:
        [following] = await ingest_each(server.stub, gms("m-2"))
        assert cursors_of(await read_changes(call, 1)) == [following]


@pytest.mark.parametrize(
    "interval",
    [
        pytest.param(Duration(seconds=-1), id="negative"),
        pytest.param(Duration(), id="zero"),
        pytest.param(Duration(nanos=99_999_999), id="under-100ms"),
        pytest.param(Duration(seconds=3600, nanos=1), id="over-1h"),
        pytest.param(Duration(seconds=1, nanos=-500_000_000), id="mixed-signs"),
        pytest.param(Duration(seconds=1, nanos=1_000_000_000), id="nanos-overflow"),
    ],
)
async def test_stream_with_a_heartbeat_interval_out_of_range(server: Running, interval: Duration) -> None:
    details = await stream_failure(server.stub.Stream(StreamRequest(heartbeat_interval=interval)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_HEARTBEAT_INTERVAL"
    assert details.fields == ["heartbeat_interval"]


async def test_stream_heartbeats_as_often_as_a_tenth_of_a_second(server: Running) -> None:
    request = StreamRequest(heartbeat_interval=Duration(nanos=100_000_000))
    async with streaming(server.stub, request, start=0) as call:
        async with asyncio.timeout(TIMEOUT):  # three heartbeats, each after 0.1 s of nothing
            for _ in range(3):
                assert (await read_message(call)).WhichOneof("event") == "heartbeat"


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
            cursors += [position(result.cursor) for result in response.results]
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

        writers = 20
        acknowledged = ["before-stop"]
        answered: set[int] = set()  # the writers that have had an answer
        all_writing = asyncio.Event()  # set once all have: the stop then meets calls in flight

        async def ingest_until_stopped(writer: int) -> None:
            for number in itertools.count():
                try:
                    answer = await ingest(own.stub, gms_payload(gms(f"racing-{writer}-{number}")))
                except grpc.aio.AioRpcError:
                    return
                assert answer.accepted_count == 1
                acknowledged.append(f"racing-{writer}-{number}")
                answered.add(writer)
                if len(answered) == writers:
                    all_writing.set()

        racing = [asyncio.create_task(ingest_until_stopped(writer)) for writer in range(writers)]
        await asyncio.wait_for(all_writing.wait(), TIMEOUT)
        await asyncio.wait_for(own.stop(), TIMEOUT)

        # The stream ended cleanly: OK, after at most the changes committed before it closed.
        async with asyncio.timeout(TIMEOUT):
            while isinstance(message := await call.read(), StreamResponse):
                assert message.HasField("heartbeat") or message.change.report.message_id.startswith("racing-")
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(asyncio.gather(*racing), TIMEOUT)

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
        AsyncGenerator[list[EncodedChange] | Heartbeat, None],
        follow_batches(running.store, running.hub, read, ChangeFilter(), 0, 15, max_batch=500),
    )
    try:
        assert await anext(feed) == Heartbeat(0)
        first_batch = await anext(feed)
        assert isinstance(first_batch, list)
        assert len(first_batch) == FIRST_READ  # a catch-up's first read asks for a few
        running.hub.close()  # shutdown, with most of the changes still to replay
        assert [item async for item in feed] == []
    finally:
        await feed.aclose()


def test_buffer_overflows_are_counted_once_each_and_stay_counted_after_the_subscriber_leaves() -> None:
    hub = Hub(capacity=2)
    slow = hub.subscribe(ChangeFilter())
    report = DeliveryReport(message_id="m-1")
    hub.publish(Change(cursor, report, report) for cursor in range(1, 6))  # overflows at the third
    assert slow.overflowed
    assert hub.overflows == 1  # once per fall-behind, not per change offered while behind
    hub.unsubscribe(slow)
    assert hub.overflows == 1
