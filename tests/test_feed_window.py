"""The live feed's window: bounded in encoded bytes (DLRHUB_STREAM_BUFFER_BYTES) and in changes,
shared by every subscriber, and emptied once every subscriber has read it.

A subscriber that falls out of the window catches up from the store and misses nothing; what this
costs in resident memory with large reports is measured by bench/feed_memory_bench.py.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration
from hypothesis import given
from hypothesis import strategies as st

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import StreamRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub.feed.encoding import EncodedChange
from dlrhub.feed.hub import Hub
from dlrhub.store.base import Change, ChangeFilter
from tests.conftest import FakeClock, serving
from tests.helpers import TIMEOUT, cursors_of, eventually, ingest, read_changes, read_start, ssr, ssr_payload

EVERYTHING = 1 << 30  # a take's limits, when they should not stop it


def change(cursor: int, padding: int = 0) -> Change:
    report = DeliveryReport(message_id=f"m-{cursor}", raw_payload="x" * padding)
    return Change(cursor, report, report)


def size(cursor: int, padding: int = 0) -> int:
    return EncodedChange(change(cursor, padding)).size


def test_a_change_leaves_the_window_once_every_subscriber_has_read_it() -> None:
    hub = Hub()
    first, second = hub.subscribe(ChangeFilter()), hub.subscribe(ChangeFilter())
    hub.publish(change(cursor, 100) for cursor in (1, 2, 3))
    assert (hub.buffered_changes, hub.buffered_bytes) == (3, 3 * size(1, 100))

    assert [c.cursor for c in first.take(0, EVERYTHING, EVERYTHING)] == [1, 2, 3]
    assert hub.buffered_changes == 3  # the second has still to read them
    assert [c.cursor for c in second.take(0, 2, EVERYTHING)] == [1, 2]
    assert (hub.buffered_changes, hub.buffered_bytes) == (1, size(3, 100))
    assert [c.cursor for c in second.take(2, EVERYTHING, EVERYTHING)] == [3]
    assert (hub.buffered_changes, hub.buffered_bytes) == (0, 0)

    # A subscriber that leaves without reading lets go of what it had to read.
    hub.publish([change(4, 100)])
    assert hub.buffered_changes == 1
    hub.unsubscribe(second)
    assert hub.buffered_changes == 1  # the first has still to read it
    hub.unsubscribe(first)
    assert (hub.buffered_changes, hub.buffered_bytes) == (0, 0)

    # With nobody reading live, nothing is kept.
    hub.publish([change(5, 100)])
    assert (hub.buffered_changes, hub.buffered_bytes, hub.latest_cursor) == (0, 0, 5)


def test_a_take_stops_at_its_byte_limit_but_takes_at_least_one_change() -> None:
    hub = Hub()
    subscription = hub.subscribe(ChangeFilter())
    hub.publish(change(cursor, 1000) for cursor in range(1, 6))
    one = size(1, 1000)
    assert [c.cursor for c in subscription.take(0, EVERYTHING, 2 * one)] == [1, 2]
    assert [c.cursor for c in subscription.take(2, EVERYTHING, one // 2)] == [3]  # bigger than the limit
    assert [c.cursor for c in subscription.take(3, EVERYTHING, EVERYTHING)] == [4, 5]


@given(
    commits=st.lists(st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=8), max_size=30),
    budget=st.integers(min_value=1, max_value=20_000),
)
def test_the_window_never_holds_more_than_its_byte_budget(commits: list[list[int]], budget: int) -> None:
    """A stalled subscriber, and one that reads everything after each commit: the window stays within
    the budget; the stalled one falls out once what it has not read passes the budget, the reader
    only when one commit alone is over it, and until then the reader gets every change once."""
    hub = Hub(max_bytes=budget)
    stalled, reader = hub.subscribe(ChangeFilter()), hub.subscribe(ChangeFilter())
    cursors = itertools.count(1)
    published: list[int] = []
    got: list[int] = []
    unread = 0  # by the stalled subscriber
    for paddings in commits:
        commit = [change(next(cursors), padding) for padding in paddings]
        commit_bytes = sum(EncodedChange(c).size for c in commit)
        hub.publish(commit)
        published += [c.cursor for c in commit]
        unread += commit_bytes
        assert hub.buffered_bytes <= budget
        assert stalled.overflowed == (unread > budget)
        assert reader.overflowed == (commit_bytes > budget)
        if reader.overflowed:
            break
        got += [c.cursor for c in reader.take(got[-1] if got else 0, EVERYTHING, EVERYTHING)]
        assert got == published
        assert hub.buffered_bytes == (0 if stalled.overflowed else unread)
    assert hub.overflows == stalled.overflowed + reader.overflowed


async def test_a_slow_subscriber_with_a_small_byte_budget_falls_out_and_catches_up_missing_nothing(
    tmp_path: Path, clock: FakeClock
) -> None:
    budget = 256 << 10
    async with serving(tmp_path, clock=clock, stream_buffer_bytes=budget) as running:
        address = f"127.0.0.1:{running.port}"
        hub = running.hub
        async with (
            grpc.aio.insecure_channel(address) as channel,
            # No BDP probing: the HTTP/2 window stays at 64 KiB, so the stall reaches the server.
            grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)]) as stalled_channel,
        ):
            stub = DeliveryReportServiceStub(channel)
            request = StreamRequest(heartbeat_interval=Duration(seconds=30))
            stalled = DeliveryReportServiceStub(stalled_channel).Stream(request, timeout=60)
            reader = stub.Stream(request, timeout=60)
            try:
                assert await read_start(stalled) == await read_start(reader) == 0
                # 40 reports of ~5 KB (a change carries the text and the reference it holds, in the
                # report and in the state: ~20 KB), 4 a commit: ~800 KB in all, three times the budget.
                padding = "x" * 5_000
                cursors: list[int] = []
                most = 0
                for batch in range(10):
                    reports = [{**ssr(f"w-{batch}-{n}"), "callbackData": padding} for n in range(4)]
                    answer = await ingest(stub, ssr_payload(*reports))
                    cursors += [int(result.cursor) for result in answer.results]
                    assert hub.buffered_bytes <= budget  # published before the answer
                    most = max(most, hub.buffered_bytes)
                    # The reader keeps up; the stalled stream reads nothing.
                    assert cursors_of(await read_changes(reader, 4)) == cursors[-4:]
                assert most > budget // 2  # the stalled subscriber did hold the window
                assert hub.overflows >= 1
                # Reading again, it gets every change once, in order: what fell out, from the store.
                assert cursors_of(await read_changes(stalled, len(cursors))) == cursors
                # Once both have read everything, the window is empty.
                await eventually(lambda: hub.buffered_bytes == 0, "the window let go of what was read")
                assert hub.buffered_changes == 0
            finally:
                stalled.cancel()
                reader.cancel()
            await asyncio.wait_for(channel.channel_ready(), TIMEOUT)
