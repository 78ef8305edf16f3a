"""The follower (feed/follower.py): Streams fed by reading the store back, as on a shared database.

Here over SQLite marked as shared, so the app runs exactly as it does over PostgreSQL (the committer
only wakes the follower; the follower publishes); test_replicas.py runs it across processes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from deliveryreport.v1.delivery_report_service_pb2 import StreamRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub.app import App
from dlrhub.store import SqliteStore
from tests.conftest import FakeClock, serving
from tests.helpers import (
    ACCEPTED,
    DUPLICATE,
    cursors_of,
    gms,
    ingest,
    payload_of,
    read_changes,
    read_start,
    ssr,
)

if TYPE_CHECKING:
    from tests.helpers import Stub


class SharedSqlite(SqliteStore):
    """The SQLite store as if other processes wrote it too: the app feeds Streams through the
    follower, not from its commits."""

    shared = True


@pytest.fixture
async def followed(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[App, Stub]]:
    store = SharedSqlite(tmp_path / "dlrhub.db")
    async with serving(tmp_path, clock=clock, store=store) as running:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            yield running, DeliveryReportServiceStub(channel)
        finally:
            await channel.close(None)


async def test_only_a_shared_store_gets_a_follower(tmp_path: Path, clock: FakeClock) -> None:
    async with serving(tmp_path, clock=clock) as running:
        assert running.follower is None


async def _ingest_all(stub: Stub, reports: list[dict[str, object]]) -> list[int]:
    """Ingests each report in its own call; the cursors of those stored."""
    cursors = []
    for report in reports:
        response = await ingest(stub, payload_of(report))
        [result] = response.results
        assert result.outcome in (ACCEPTED, DUPLICATE)
        if result.outcome == ACCEPTED:
            cursors.append(int(result.cursor))
    return cursors


async def test_every_subscriber_gets_every_change_once_in_order(followed: tuple[App, Stub]) -> None:
    running, stub = followed
    assert running.follower is not None
    shuffled = random.Random(15)
    writers = []
    for writer in range(3):
        reports: list[dict[str, object]] = [
            report
            for n in range(12)
            for report in (gms(f"m-{writer}-{n}"), ssr(f"s-{writer}-{n}", "SENT", seconds=n))
        ]
        reports += shuffled.sample(reports, 4)  # duplicates, answered without a change
        writers.append(reports)

    live = stub.Stream(StreamRequest())
    start = await read_start(live)
    writing = [asyncio.create_task(_ingest_all(stub, reports)) for reports in writers]
    # One more subscriber joins mid-way, replaying from the start, and one resumes mid-way.
    replay = stub.Stream(StreamRequest(from_beginning=True))
    assert await read_start(replay) == 0
    stored = sorted(cursor for cursors in await asyncio.gather(*writing) for cursor in cursors)
    assert len(stored) == 72
    resumed_from = stored[30]
    resumed = stub.Stream(StreamRequest(cursor=str(resumed_from)))
    assert await read_start(resumed) == resumed_from
    try:
        assert cursors_of(await read_changes(live, 72)) == [cursor for cursor in stored if cursor > start]
        assert cursors_of(await read_changes(replay, 72)) == stored
        assert cursors_of(await read_changes(resumed, 41)) == stored[31:]
    finally:
        for call in (live, replay, resumed):
            call.cancel()
    assert running.hub.latest_cursor == stored[-1]
    assert running.metrics.render().count(b"dlrhub_stream_lag_seconds 0.0") == 1
