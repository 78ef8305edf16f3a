"""Replicas: several `dlrhub serve` processes over one PostgreSQL database (real processes, real PG).

Concurrent writers send reports of the same messages, in random orders with duplicates, to random
replicas; the result must be what one SQLite process stores, every subscriber on every replica must
see every change once in one global order (also one that resumes on another replica), and the cursor
of an Ingest answer must keep its promise across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    IngestRequest,
    IngestResponse,
    IngestResponseView,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub.merge import digest
from tests.conftest import FakeClock, serving
from tests.helpers import ACCEPTED, DUPLICATE, TIMEOUT, get_message, gms, payload_of, read_message, ssr
from tests.postgres import fresh_database, position
from tools import launcher

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub as Stub
    from tests.helpers import StreamCall

REPLICAS = 3
FULL = IngestResponseView.INGEST_RESPONSE_VIEW_FULL


@pytest.fixture(scope="module")
def shared_db(postgres_url: str) -> Iterator[str]:
    """One database for the module's replicas (the tests use distinct message ids)."""
    with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="module")
def replicas(shared_db: str) -> Iterator[list[launcher.Server]]:
    """Three `dlrhub serve` processes over the one database, started together (their migrations race)."""
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(REPLICAS) as starting:
        started = [starting.submit(launcher.start, shared_db) for _ in range(REPLICAS)]
        servers = [stack.enter_context(future.result()) for future in started]
        yield servers


@contextlib.asynccontextmanager
async def stubs(servers: Sequence[launcher.Server]) -> AsyncIterator[list[Stub]]:
    channels = [grpc.aio.insecure_channel(server.address) for server in servers]
    try:
        yield [DeliveryReportServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close(None)


def reports_of(prefix: str, messages: int, seed: int) -> list[str]:
    """Payloads of several reports per message (statuses in and out of order, both sources), with
    duplicates, shuffled: one report or a small batch each."""
    shuffled = random.Random(seed)
    reports: list[dict[str, object]] = []
    for n in range(messages):
        message = f"{prefix}-{n}"
        reports += [
            ssr(message, "ACCEPTED", seconds=1, bulk_id=f"{prefix}-bulk"),
            ssr(message, "SENT", seconds=2),
            ssr(message, "DELIVERED", seconds=3, reference=f"ref-{n}"),
            ssr(message, "SEEN", seconds=4),
            gms(message, "SENT", seconds=1),
            gms(message, "DELIVERED", seconds=5),
        ]
    reports += shuffled.sample(reports, len(reports) // 3)
    shuffled.shuffle(reports)
    return [payload_of(report) for report in reports]


@dataclass
class Written:
    """What the writers were told: the message id and digest of each report stored, by cursor."""

    stored: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    answers: int = 0

    def record(self, response: IngestResponse) -> None:
        for result in response.results:
            assert result.outcome in (ACCEPTED, DUPLICATE)
            if result.outcome == ACCEPTED:
                self.stored[result.cursor] = (result.message_id, digest(result.report))
        self.answers += 1


async def write(
    replicas: Sequence[Stub], payloads: Sequence[str], writers: int, seed: int, written: Written
) -> None:
    """`writers` concurrent callers, each sending its share of `payloads` to random replicas."""
    choose = random.Random(seed)

    async def writer(share: Sequence[str]) -> None:
        for payload in share:
            stub = choose.choice(replicas)
            request = IngestRequest(payload=payload, view=FULL)
            written.record(await asyncio.wait_for(stub.Ingest(request), TIMEOUT))

    await asyncio.gather(*(writer(payloads[n::writers]) for n in range(writers)))


async def collect(call: StreamCall, until: int | set[str], into: list[StreamResponse]) -> None:
    """Reads the stream into `into` until it holds `until` changes (or these cursors)."""
    delivered = set(changes_of(into))
    while len(delivered) < until if isinstance(until, int) else not until <= delivered:
        message = await read_message(call)
        assert isinstance(message, StreamResponse), "the stream ended"
        into.append(message)
        if message.HasField("change"):
            delivered.add(message.cursor)


def changes_of(messages: Sequence[StreamResponse]) -> list[str]:
    return [message.cursor for message in messages if message.HasField("change")]


def comparable(state: DeliveryReport) -> DeliveryReport:
    """A state without what depends on which copy of the winning report arrived first."""
    copy = DeliveryReport()
    copy.CopyFrom(state)
    copy.ClearField("received_time")
    copy.ClearField("raw_payload")
    return copy


async def states_and_histories(
    stub: Stub, message_ids: Sequence[str]
) -> dict[str, tuple[list[bytes], list[bytes]]]:
    """Each message's states (see `comparable`) and the digests of its history, sorted."""
    found = {}
    for message_id in message_ids:
        response = await get_message(stub, GetMessageRequest(message_id=message_id, include_history=True))
        found[message_id] = (
            sorted(comparable(state).SerializeToString(deterministic=True) for state in response.messages),
            sorted(digest(report) for report in response.history),
        )
    return found


async def test_concurrent_writers_on_three_replicas_store_what_one_sqlite_process_stores(
    replicas: list[launcher.Server], tmp_path: Path
) -> None:
    message_ids = [f"same-{n}" for n in range(12)]
    payloads = reports_of("same", len(message_ids), seed=1)
    written = Written()
    async with stubs(replicas) as replica_stubs:
        # A subscriber on every replica from the start, and one that moves to another replica.
        calls = [stub.Stream(StreamRequest(message_ids=message_ids)) for stub in replica_stubs]
        for call in calls:
            assert (await read_message(call)).HasField("heartbeat")
        mover = replica_stubs[0].Stream(StreamRequest(message_ids=message_ids))
        moved: list[StreamResponse] = [await read_message(mover)]
        await write(replica_stubs, payloads, writers=6, seed=2, written=written)
        stored = sorted(written.stored, key=position)

        # The mover reads a third, leaves, and resumes on another replica after its last cursor.
        await collect(mover, len(stored) // 3, moved)
        mover.cancel()
        mover = replica_stubs[1].Stream(StreamRequest(message_ids=message_ids, cursor=moved[-1].cursor))
        resumed = [await read_message(mover)]
        assert resumed[0].HasField("heartbeat")
        assert resumed[0].cursor == moved[-1].cursor
        await collect(mover, len(stored) - len(changes_of(moved)), resumed)
        mover.cancel()

        seen = []
        for call in calls:
            messages: list[StreamResponse] = []
            await collect(call, len(stored), messages)
            call.cancel()
            seen.append(changes_of(messages))
        # Every change once, in one order (the cursors' order) on every replica; none missing.
        for cursors in [*seen, changes_of(moved) + changes_of(resumed)]:
            assert cursors == stored

        replicated = [await states_and_histories(stub, message_ids) for stub in replica_stubs]
    assert replicated[0] == replicated[1] == replicated[2]

    # The same reports, in their order, through one SQLite process.
    async with serving(tmp_path, clock=FakeClock()) as alone, stubs_of_app(alone.port) as stub:
        for payload in payloads:
            await asyncio.wait_for(stub.Ingest(IngestRequest(payload=payload)), TIMEOUT)
        assert await states_and_histories(stub, message_ids) == replicated[0]


@contextlib.asynccontextmanager
async def stubs_of_app(port: int) -> AsyncIterator[Stub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield DeliveryReportServiceStub(channel)
    finally:
        await channel.close(None)


async def test_an_ingest_cursor_is_covered_on_another_replica_once_a_stream_passes_it(
    replicas: list[launcher.Server],
) -> None:
    """IngestResult.cursor's promise: a Stream that has delivered a cursor at or past it has delivered
    the report, if it matched; and it may be passed as a Stream cursor to any replica at once."""
    message_ids = [f"promise-{n}" for n in range(6)]
    payloads = reports_of("promise", len(message_ids), seed=3)
    watched = set(message_ids[:3])
    written = Written()
    async with stubs(replicas) as replica_stubs:
        everything = replica_stubs[1].Stream(StreamRequest())
        some = replica_stubs[2].Stream(StreamRequest(message_ids=sorted(watched)))
        first = [await read_message(call) for call in (everything, some)]
        await write(replica_stubs[:1], payloads, writers=4, seed=4, written=written)
        last = max(written.stored, key=position)
        # An answer's cursor, passed on at once to another replica, is a valid place to start.
        starting = replica_stubs[2].Stream(StreamRequest(cursor=last))
        assert (await read_message(starting)).cursor == last
        starting.cancel()

        wanted = sum(message_id in watched for message_id, _ in written.stored.values())
        streams: list[list[StreamResponse]] = [[first[0]], [first[1]]]
        await collect(everything, len(written.stored), streams[0])
        await collect(some, wanted, streams[1])
        for call in (everything, some):
            call.cancel()
    for messages, matches in ((streams[0], set(message_ids)), (streams[1], watched)):
        delivered: set[str] = set()
        for message in messages:
            if message.HasField("change"):
                delivered.add(message.cursor)
            covered = {
                cursor
                for cursor, (message_id, _) in written.stored.items()
                if message_id in matches and position(cursor) <= position(message.cursor)
            }
            assert covered <= delivered, f"passed {message.cursor} before delivering {covered - delivered}"


async def test_a_replica_killed_mid_ingest_loses_nothing_acknowledged(
    replicas: list[launcher.Server], shared_db: str
) -> None:
    victim = launcher.start(shared_db)
    message_ids = [f"kill-{n}" for n in range(10)]
    payloads = reports_of("kill", len(message_ids), seed=5)
    written = Written()
    refused: list[grpc.StatusCode] = []
    async with stubs([*replicas, victim]) as replica_stubs:
        watcher = replica_stubs[0].Stream(StreamRequest(message_ids=message_ids))
        watched = [await read_message(watcher)]

        async def writer(share: Sequence[str]) -> None:
            for n, payload in enumerate(share):
                if written.answers >= len(payloads) // 3 and victim.process.poll() is None:
                    victim.process.kill()  # SIGKILL, with calls in flight on it
                stub = replica_stubs[n % len(replica_stubs)]
                try:
                    response = await asyncio.wait_for(
                        stub.Ingest(IngestRequest(payload=payload, view=FULL)), TIMEOUT
                    )
                except grpc.aio.AioRpcError as error:
                    refused.append(error.code())
                else:
                    written.record(response)

        await asyncio.gather(*(writer(payloads[n::4]) for n in range(4)))
        assert victim.stop() == -signal.SIGKILL
        # Calls went to it after it died, and none was acknowledged.
        assert refused
        assert set(refused) == {grpc.StatusCode.UNAVAILABLE}
        # The others' stream carried on: every acknowledged change, once each, in order.
        await collect(watcher, set(written.stored), watched)
        watcher.cancel()
        delivered = changes_of(watched)
        assert delivered == sorted(set(delivered), key=position)
        acknowledged = {report_digest for _, report_digest in written.stored.values()}
        for stub in replica_stubs[:REPLICAS]:
            histories = await states_and_histories(stub, message_ids)
            present = {report_digest for _, digests in histories.values() for report_digest in digests}
            assert acknowledged <= present
