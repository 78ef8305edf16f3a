"""The follower (feed/follower.py): Streams fed by reading the store back, as on a shared database.

Here over SQLite marked as shared, so the app runs exactly as it does over PostgreSQL (the committer
only wakes the follower; the follower publishes); test_replicas.py runs it across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest

from deliveryreport.v1.delivery_report_service_pb2 import StreamRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub.app import App
from dlrhub.store import PostgresStore, SqliteStore
from dlrhub.store.base import Change
from tests.conftest import FakeClock, serving
from tests.helpers import (
    ACCEPTED,
    DUPLICATE,
    cursors_of,
    eventually,
    failure,
    gms,
    ingest,
    payload_of,
    read_changes,
    read_message,
    read_start,
    ssr,
)
from tests.postgres import position

LAG = "dlrhub_stream_lag_seconds "

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub as Stub


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
    assert _lag(running) == 0.0


@contextlib.asynccontextmanager
async def replica(
    tmp_path: Path, url: str, name: str, clock: FakeClock | None = None
) -> AsyncIterator[tuple[App, Stub]]:
    """An in-process app over the PostgreSQL database at `url`, and a stub on it."""
    async with serving(tmp_path / name, clock=clock, store=PostgresStore(url)) as running:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            yield running, DeliveryReportServiceStub(channel)
        finally:
            await channel.close(None)


def _lag(running: App) -> float:
    [line] = [line for line in running.metrics.render().decode().splitlines() if line.startswith(LAG)]
    return float(line.split()[1])


async def test_a_change_reaches_another_replica_once_every_older_transaction_has_ended(
    tmp_path: Path, postgres_db: str
) -> None:
    async with (
        replica(tmp_path, postgres_db, "a") as (a, stub_a),
        replica(tmp_path, postgres_db, "b") as (
            b,
            stub_b,
        ),
    ):
        assert a.follower is not None
        assert b.follower is not None
        subscriber = stub_b.Stream(StreamRequest())
        assert (await read_message(subscriber)).HasField("heartbeat")
        first = await ingest(stub_a, payload_of(gms("held-1")))
        [change] = await read_changes(subscriber, 1)
        assert change.cursor == first.results[0].cursor

        # A transaction that began earlier and is still open (anywhere on the database) may yet
        # commit a smaller position: what commits after it waits, and the lag shows it.
        with psycopg.connect(postgres_db, autocommit=True) as other:
            with other.transaction():
                other.execute("SELECT pg_current_xact_id()")
                second = await ingest(stub_a, payload_of(gms("held-2")))
                await eventually(lambda: _lag(b) > 0 and _lag(a) > 0, "the lag of both replicas above 0")
                assert b.hub.latest_cursor == a.hub.latest_cursor == position(change.cursor)
            [change] = await read_changes(subscriber, 1)
        assert change.cursor == second.results[0].cursor
        await eventually(lambda: _lag(a) == _lag(b) == 0.0, "no lag once it has ended")
        subscriber.cancel()


class HeldChanges(PostgresStore):
    """A PostgresStore whose `changes` waits while `free` is clear: the follower's reads held up (a
    replica that is slow to read, or cannot reach the database for a while)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.free = threading.Event()
        self.free.set()

    def changes(self, after: int, limit: int) -> list[Change]:
        self.free.wait()
        return super().changes(after, limit)


async def test_a_live_stream_ends_cursor_pruned_when_a_prune_deletes_a_change_before_it_was_followed(
    tmp_path: Path, postgres_db: str, clock: FakeClock
) -> None:
    """A change that a replica's follower has not read yet may be pruned (by any replica) before it
    does: its live subscribers are told, as a catch-up would be, not skipped."""
    day = 86_400
    store = HeldChanges(postgres_db)
    async with serving(tmp_path, clock=clock, store=store) as running:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub: Stub = DeliveryReportServiceStub(channel)
        subscriber = stub.Stream(StreamRequest())
        try:
            start = await read_start(subscriber)
            store.free.clear()
            [late] = (await ingest(stub, payload_of(gms("late")))).results  # final
            clock.advance(2 * day)
            assert (await running.retention.prune(day)).total.messages == 1
            store.free.set()
            [after] = (await ingest(stub, payload_of(gms("after")))).results
            assert start < position(late.cursor) < position(after.cursor)
            details = await failure(subscriber.read())  # not `after`, with `late` skipped
            assert (details.code, details.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_PRUNED")
            assert details.metadata["oldest_cursor"] == late.cursor
        finally:
            store.free.set()
            subscriber.cancel()
            await channel.close(None)
