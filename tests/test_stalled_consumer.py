"""A stalled Stream consumer: Ingest goes on, and the consumer misses nothing when it reads again.

A consumer that opens a stream and then reads nothing fills its HTTP/2 window; the server's send
then waits, the subscriber falls out of the hub's bounded window of recent changes, and the stream
catches up from the store once the consumer reads again. Publishing never waits for a subscriber,
so Ingest keeps being acknowledged meanwhile.

How much a stalled consumer costs ingest throughput is measured by bench/stalled_consumer_bench.py
(a performance figure belongs in a benchmark, not in a timed unit test); here the behaviour is
checked: every Ingest is acknowledged during the stall, and afterwards every change arrives, in
cursor order, exactly once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from google.protobuf.duration_pb2 import Duration

from deliveryreport.v1.delivery_report_pb2 import DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import (
    Format,
    IngestRequest,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.feed.encoding import EncodedChange
from dlrhub.feed.follow import Heartbeat, follow_batches
from dlrhub.store.base import ChangeFilter
from tests.conftest import FakeClock, Running
from tests.helpers import FULL, TIMEOUT

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

T = TypeVar("T")
WRITERS = 4
CALLS_PER_WRITER = 50
DELIVERED = DeliveryStatus.DELIVERY_STATUS_DELIVERED
# No BDP probing: the HTTP/2 window stays at its initial 64 KiB, so a consumer that reads nothing
# holds up the server's sends after a few hundred changes (with probing, the client's transport
# would first take megabytes into its own buffers, and the stall would reach the server only later).
STALLED_CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0)]


@dataclass
class Acked:
    """Every acknowledged report: cursor -> (message id, status)."""

    reports: dict[int, tuple[str, int]] = field(default_factory=dict)

    def cursors(self, status: int | None = None) -> list[int]:
        return sorted(c for c, (_, s) in self.reports.items() if status is None or s == status)


def gms_item(message_id: str, status: int, index: int) -> dict[str, Any]:
    return {
        "number": "380961111111",
        "time": 1_700_000_000_000 + index,
        "status": status,
        "substatus": 23,
        "hyber_status": 23011,
        "message_id": message_id,
        "sent_via": "sms",
    }


async def ingest_load(stub: DeliveryReportServiceAsyncStub, acked: Acked, writer: int) -> None:
    """Batches of 1-5 GMS reports, DELIVERED (status 2) and SENT (status 1) in turn."""
    for call in range(CALLS_PER_WRITER):
        items = [
            gms_item(f"w{writer}-c{call}-i{index}", 2 if (call + index) % 2 else 1, index)
            for index in range(1 + (call + writer) % 5)
        ]
        response = await stub.Ingest(
            IngestRequest(payload=json.dumps(items), format=Format.FORMAT_GMS, view=FULL), timeout=TIMEOUT
        )
        assert response.accepted_count == len(items)
        for result in response.results:
            acked.reports[int(result.cursor)] = (result.report.message_id, result.report.status)


async def read_until_heartbeat_at(
    responses: AsyncIterator[StreamResponse], cursor: int, got: list[tuple[int, str, int]]
) -> None:
    """Appends changes to `got` until a heartbeat says the stream has covered `cursor`.

    Waiting for the heartbeat (not only the last change) shows nothing else, a duplicate say,
    was still to come.
    """
    async for response in responses:
        if response.HasField("heartbeat"):
            if int(response.cursor) >= cursor:
                return
        else:
            got.append(
                (int(response.cursor), response.change.report.message_id, response.change.report.status)
            )


async def first(responses: AsyncIterator[T]) -> T:
    return await asyncio.wait_for(anext(responses), TIMEOUT)


async def test_stalled_consumer_misses_nothing_and_does_not_hold_up_ingest(
    db_path: Path, clock: FakeClock
) -> None:
    running = await app.start(
        Settings(
            listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=db_path, shutdown_grace=1.0, stream_buffer=32
        ),
        clock=clock,
    )
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(address)
    stalled_channel = grpc.aio.insecure_channel(address, options=STALLED_CHANNEL_OPTIONS)
    try:
        stub: DeliveryReportServiceAsyncStub = DeliveryReportServiceStub(channel)
        stalled_stub: DeliveryReportServiceAsyncStub = DeliveryReportServiceStub(stalled_channel)
        everything = stalled_stub.Stream(
            StreamRequest(from_beginning=True, heartbeat_interval=Duration(seconds=1)), timeout=60
        )
        delivered = stalled_stub.Stream(
            StreamRequest(from_beginning=True, statuses=[DELIVERED], heartbeat_interval=Duration(seconds=1)),
            timeout=60,
        )
        stalled = [everything.__aiter__(), delivered.__aiter__()]
        for responses in stalled:  # both are live: from here on they read nothing until the load ends
            start = await first(responses)
            assert (start.HasField("heartbeat"), start.cursor) == (True, "0")

        # A consumer that keeps reading, beside them (its filter matches every report here).
        live = stub.Stream(
            StreamRequest(source=Source.SOURCE_GMS, heartbeat_interval=Duration(seconds=1)), timeout=60
        ).__aiter__()
        await first(live)
        live_got: list[tuple[int, str, int]] = []
        acked = Acked()
        live_task = asyncio.create_task(read_until_heartbeat_at(live, 2**62, live_got))

        await asyncio.wait_for(
            asyncio.gather(*(ingest_load(stub, acked, writer) for writer in range(WRITERS))), 60
        )
        live_during_load = len(live_got)

        # The stall reached the server: its sends wait on the HTTP/2 window, and the hub let the
        # stalled subscribers fall out of its window (marked overflowed) rather than wait for them.
        subscriptions = running.hub.subscriptions
        assert len(subscriptions) == 3
        stalled_subscriptions = [
            s for s in subscriptions if s.filter != ChangeFilter(source=Source.SOURCE_GMS)
        ]
        assert len(stalled_subscriptions) == 2
        assert all(s.overflowed for s in stalled_subscriptions)
        assert live_during_load > 0  # the other consumer was served during the stall

        # Reading again: every change exactly once, in cursor order, caught up from the store.
        latest = max(acked.reports)
        assert latest == running.store.latest_cursor() == len(acked.reports)
        got_everything: list[tuple[int, str, int]] = []
        got_delivered: list[tuple[int, str, int]] = []
        await asyncio.wait_for(
            asyncio.gather(
                read_until_heartbeat_at(stalled[0], latest, got_everything),
                read_until_heartbeat_at(stalled[1], latest, got_delivered),
            ),
            30,
        )
        expected = [(cursor, *acked.reports[cursor]) for cursor in acked.cursors()]
        assert got_everything == expected
        assert got_delivered == [(cursor, *acked.reports[cursor]) for cursor in acked.cursors(DELIVERED)]
        assert 0 < len(got_delivered) < len(got_everything)

        live_task.cancel()
        assert [cursor for cursor, _, _ in live_got] == acked.cursors()[: len(live_got)]
        assert len(live_got) == len(expected)
    finally:
        await stalled_channel.close(None)
        await channel.close(None)
        await running.stop()


async def test_a_change_published_as_the_heartbeat_wait_times_out_is_not_skipped(server: Running) -> None:
    """follow_batches() with a heartbeat so short that it times out around every publish.

    A change published between the wait's timeout and the follower's turn sits in the buffer; the
    heartbeat must not move the cursor past it (that would skip it, here and on resume).
    """
    loop = asyncio.get_running_loop()
    running = server.app

    def read(call: Any) -> Any:
        return loop.run_in_executor(running.reads, call)

    acked: list[int] = []
    done = asyncio.Event()

    async def produce() -> None:
        for index in range(300):
            response = await server.stub.Ingest(
                IngestRequest(payload=json.dumps(gms_item(f"hb-{index}", 2, index))), timeout=TIMEOUT
            )
            acked.append(int(response.results[0].cursor))
        done.set()

    got: list[int] = []
    heartbeats = 0

    async def consume() -> None:
        nonlocal heartbeats
        feed = cast(
            AsyncGenerator[list[EncodedChange] | Heartbeat, None],
            follow_batches(running.store, running.hub, read, ChangeFilter(), 0, 0.001),
        )
        try:
            async for item in feed:
                if isinstance(item, Heartbeat):
                    heartbeats += 1
                    cursor = item.cursor
                else:
                    got.extend(change.cursor for change in item)
                    cursor = item[-1].cursor
                if done.is_set() and cursor >= acked[-1]:
                    return
        finally:
            await feed.aclose()

    await asyncio.wait_for(asyncio.gather(produce(), consume()), 60)
    assert heartbeats > 1  # the short heartbeat did fire between the publishes
    assert got == acked
