"""StreamBatches over gRPC (Stream's feed, the changes ready together in one message), and the
encoding both streams share."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import given
from hypothesis import strategies as st

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport, DeliveryStatus
from deliveryreport.v1.delivery_report_service_pb2 import (
    StreamBatchesRequest,
    StreamBatchesResponse,
    StreamChange,
    StreamRequest,
    StreamResponse,
)
from dlrhub.feed.encoding import EncodedChange
from dlrhub.feed.encoding import batches as encode_batches
from dlrhub.feed.hub import Hub
from dlrhub.store.base import Change, ChangeFilter
from tests.conftest import FakeClock, Running
from tests.helpers import (
    TIMEOUT,
    cursors_of,
    failure,
    gms,
    gms_payload,
    ingest,
    ingest_each,
    own_server,
    position,
    read_changes,
    read_start,
    ssr,
    ssr_payload,
)

if TYPE_CHECKING:
    BatchCall = grpc.aio.UnaryStreamCall[StreamBatchesRequest, StreamBatchesResponse]


# Each test runs over SQLite and over PostgreSQL (conftest.py).
pytestmark = pytest.mark.engines
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
        assert start.HasField("heartbeat")
        assert position(start.cursor) == 0
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
        assert start.HasField("heartbeat")
        response = await ingest(server.stub, gms_payload(*(gms(f"together-{n}") for n in range(50))))
        assert response.accepted_count == 50
        # One Ingest is one commit, published at once: the waiting subscriber sends it whole.
        batch = await read_batch(call)
        assert [message.change.report.message_id for message in batch] == [f"together-{n}" for n in range(50)]
        assert cursors_of(batch) == [position(result.cursor) for result in response.results]
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
        assert [message.change.report.message_id for message in got] == [f"backlog-{n}" for n in range(1200)]
        assert max(sizes) <= 500  # read from the store 500 at a time
        assert len(sizes) >= 3
    finally:
        call.cancel()


async def test_stream_batches_of_large_changes_fit_a_default_client(server: Running) -> None:
    # 40 changes of about 120 KB (a 60 KB item's text travels in the report and in the state): 4.8 MB
    # in all. The fixture's channel has gRPC's default options: messages of up to 4 MiB.
    padding = "x" * 60_000
    cursors: list[int] = []
    for first in range(0, 40, 10):
        fat = ({**gms(f"fat-{n}"), "padding": padding} for n in range(first, first + 10))
        cursors += [position(r.cursor) for r in (await ingest(server.stub, gms_payload(*fat))).results]
    call = server.stub.StreamBatches(StreamBatchesRequest(stream=StreamRequest(from_beginning=True)))
    try:
        await read_batch(call)
        got: list[StreamResponse] = []
        batches = 0
        while len(got) < len(cursors):
            batch = await read_batch(call)
            assert StreamBatchesResponse(responses=batch).ByteSize() <= 1 << 20
            got += batch
            batches += 1
        assert cursors_of(got) == cursors
        assert batches >= 5
    finally:
        call.cancel()


async def test_a_stream_batches_consumer_that_falls_behind_catches_up_with_nothing_lost(
    db_path: Path, clock: FakeClock
) -> None:
    async with own_server(db_path, clock, stream_buffer=8) as own:
        call = own.stub.StreamBatches(StreamBatchesRequest())
        try:
            [start] = await read_batch(call)
            assert start.HasField("heartbeat")
            cursors: list[int] = []
            for batch in range(10):
                # Each commit publishes 30 changes at once: more than the buffer of 8, so the
                # subscriber overflows and reads them from the store instead.
                response = await ingest(own.stub, ssr_payload(*(ssr(f"f-{batch}-{n}") for n in range(30))))
                cursors += [position(result.cursor) for result in response.results]
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
    request = StreamBatchesRequest(stream=StreamRequest(heartbeat_interval=Duration(seconds=-1)))
    details = await failure(server.stub.StreamBatches(request).read())
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == ["stream.heartbeat_interval"]


# Stream encoding: one change, encoded once for every subscriber.


def test_a_change_is_encoded_once_and_decodes_to_its_stream_response() -> None:
    report = DeliveryReport(message_id="m-1", status=DeliveryStatus.DELIVERY_STATUS_DELIVERED)
    state = DeliveryReport(message_id="m-1", bulk_id="b-1", status=DeliveryStatus.DELIVERY_STATUS_DELIVERED)
    hub = Hub()
    first, second = hub.subscribe(ChangeFilter()), hub.subscribe(ChangeFilter())
    hub.publish([Change(7, report, state)])
    [mine] = first.take(0, 10, 1 << 20)
    [theirs] = second.take(0, 10, 1 << 20)
    assert theirs.response is mine.response  # encoded once, as published: both subscribers send it
    expected = StreamResponse(cursor="7", change=StreamChange(report=report, state=state))
    assert StreamResponse.FromString(mine.response) == expected
    [batch] = encode_batches([mine])
    assert StreamBatchesResponse.FromString(batch) == StreamBatchesResponse(responses=[expected])
    assert len(batch) == mine.size


@given(
    texts=st.lists(st.text(max_size=300), min_size=1, max_size=40),
    limit=st.integers(min_value=1, max_value=4000),
)
def test_a_batch_is_its_changes_in_order_split_at_the_byte_limit(texts: list[str], limit: int) -> None:
    changes = [
        Change(cursor, DeliveryReport(message_id=f"m-{cursor}", reference=text), DeliveryReport())
        for cursor, text in enumerate(texts, start=1)
    ]
    encoded = list(encode_batches([EncodedChange(change) for change in changes], max_bytes=limit))
    decoded = [StreamBatchesResponse.FromString(batch).responses for batch in encoded]
    assert [response.cursor for batch in decoded for response in batch] == [str(c.cursor) for c in changes]
    assert [response.change.report for batch in decoded for response in batch] == [c.report for c in changes]
    for batch, responses in zip(encoded, decoded, strict=True):
        # Over the limit only when one change alone is bigger than it.
        assert len(batch) <= limit or len(responses) == 1
