"""Crash safety: `dlrhub serve` killed with SIGKILL under concurrent Ingest, restarted on the same file.

Each round starts the real server as a subprocess on the same SQLite file, runs eight concurrent
writers (single reports and small batches, every message id unique) and one Stream consumer, and
kills the server with SIGKILL at a seeded random moment. After every kill, a copy of the database
files (the server's own file is left for the next start to recover) must pass
`PRAGMA integrity_check` and hold every report whose Ingest was acknowledged, at the cursor the
answer gave; cursors never go back across restarts; and what the consumer has seen is exactly the
stored changes up to the last cursor it saw. The consumer resumes after each restart from that
cursor, so the union of what it got is every stored change, in cursor order, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.duration_pb2 import Duration

from deliveryreport.v1.delivery_report_service_pb2 import (
    Format,
    GetMessageRequest,
    IngestOutcome,
    IngestRequest,
    StreamRequest,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from tests.helpers import TIMEOUT
from tools import launcher

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

SEED = 20_240_611
ROUNDS = 4
WRITERS = 8
FETCH_SAMPLE = 25


@dataclass
class Ledger:
    """What the clients know, across every round."""

    # Acknowledged reports: message id -> the cursor its IngestResult gave.
    acked: dict[str, int] = field(default_factory=dict)
    # The item each message id was sent as.
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The consumer's changes, (cursor, message id), in the order they arrived, over every round.
    seen: list[tuple[int, str]] = field(default_factory=list)
    # The last cursor the consumer saw (change or heartbeat); None before its first message.
    last_cursor: int | None = None
    # Failures while the server was up (a failure after the kill is expected).
    unexpected: list[str] = field(default_factory=list)


@dataclass
class Round:
    """One server's life: set when the load is flowing, the stream is live, the server is killed."""

    acknowledged: asyncio.Event = field(default_factory=asyncio.Event)
    streaming: asyncio.Event = field(default_factory=asyncio.Event)
    killed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Stored:
    """The database as found in a copy of its files."""

    changes: list[tuple[int, str]]  # (cursor, message id) of every stored report, by cursor
    state_cursors: dict[str, int]  # message id -> cursor of its current state


def gms_item(message_id: str, rng: random.Random) -> dict[str, Any]:
    return {
        "number": str(380_960_000_000 + rng.randrange(1_000_000)),
        "time": 1_700_000_000_000 + rng.randrange(1_000_000),
        "status": rng.choice([1, 2, 3]),
        "substatus": 23,
        "hyber_status": 23011,
        "message_id": message_id,
        "extra_id": f"ref-{rng.randrange(100)}",
        "sent_via": rng.choice(["sms", "viber"]),
    }


async def write(
    stub: DeliveryReportServiceAsyncStub,
    ledger: Ledger,
    rng: random.Random,
    prefix: str,
    life: Round,
) -> None:
    """Ingests until the server dies, recording every acknowledged report."""
    sequence = 0
    while True:
        sequence += 1
        count = 1 if rng.random() < 0.5 else rng.randint(2, 5)
        items = [gms_item(f"{prefix}-{sequence}-{index}", rng) for index in range(count)]
        payload = json.dumps(items[0] if count == 1 else items)
        request_id = f"{prefix}-{sequence}" if rng.random() < 0.5 else ""
        request = IngestRequest(payload=payload, format=Format.FORMAT_GMS, request_id=request_id)
        try:
            response = await stub.Ingest(request, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if not life.killed.is_set():
                ledger.unexpected.append(f"Ingest {prefix}-{sequence}: {error.code()} {error.details()}")
            return
        assert response.accepted_count == count, response
        for item, result in zip(items, response.results, strict=True):
            assert result.outcome == IngestOutcome.INGEST_OUTCOME_ACCEPTED
            assert result.message_id == item["message_id"]
            ledger.acked[item["message_id"]] = int(result.cursor)
            ledger.sent[item["message_id"]] = item
        life.acknowledged.set()


async def consume(
    stub: DeliveryReportServiceAsyncStub, ledger: Ledger, life: Round, until: int | None = None
) -> None:
    """Streams from the beginning, or resumes after the last cursor seen, until the stream breaks.

    With `until`, stops once it has seen that cursor.
    """
    if ledger.last_cursor is None:
        request = StreamRequest(from_beginning=True, heartbeat_interval=Duration(seconds=1))
    else:
        request = StreamRequest(cursor=str(ledger.last_cursor), heartbeat_interval=Duration(seconds=1))
    call = stub.Stream(request, timeout=60)
    try:
        async for response in call:
            cursor = int(response.cursor)
            assert ledger.last_cursor is None or cursor >= ledger.last_cursor
            if not response.HasField("heartbeat"):
                assert ledger.last_cursor is None or cursor > ledger.last_cursor
                ledger.seen.append((cursor, response.change.report.message_id))
            ledger.last_cursor = cursor
            life.streaming.set()
            if until is not None and cursor >= until:
                call.cancel()
                return
    except grpc.aio.AioRpcError as error:
        if not life.killed.is_set():
            ledger.unexpected.append(f"Stream: {error.code()} {error.details()}")


def read_copy(db: Path, directory: Path) -> Stored:
    """Copies the database files (the WAL too, uncheckpointed) and checks and reads the copy.

    Opening the copy replays its WAL, as the next start of the server will, while the server's own
    files stay exactly as the kill left them.
    """
    directory.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{db}{suffix}")
        if source.exists():
            shutil.copyfile(source, directory / f"{db.name}{suffix}")
    return read_db(directory / db.name)


def read_db(path: Path) -> Stored:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        changes = [
            (int(cursor), str(message_id))
            for cursor, message_id in connection.execute(
                "SELECT cursor, message_id FROM reports ORDER BY cursor"
            )
        ]
        state_cursors = {
            str(message_id): int(cursor)
            for message_id, cursor in connection.execute("SELECT message_id, cursor FROM messages")
        }
    return Stored(changes, state_cursors)


def check_stored(stored: Stored, ledger: Ledger, previous_max: int, round_acked: set[str]) -> None:
    cursors = [cursor for cursor, _ in stored.changes]
    assert cursors == sorted(set(cursors)), "cursors must be unique and increasing"
    by_cursor = dict(stored.changes)
    missing = [message_id for message_id in ledger.acked if message_id not in stored.state_cursors]
    assert not missing, f"{len(missing)} acknowledged reports lost, e.g. {missing[:5]}"
    for message_id, cursor in ledger.acked.items():
        assert by_cursor.get(cursor) == message_id, f"{message_id} acknowledged at cursor {cursor}"
        assert stored.state_cursors[message_id] == cursor  # each id has one report: the state is it
    # Cursors never go back: everything acknowledged in this round is after the previous rounds.
    assert all(ledger.acked[message_id] > previous_max for message_id in round_acked)
    # The consumer saw exactly the stored changes up to the last cursor it saw: no gap, no duplicate,
    # and nothing that is not stored (a change is published only after its commit).
    last = ledger.last_cursor or 0
    assert ledger.seen == [(cursor, message_id) for cursor, message_id in stored.changes if cursor <= last]


async def check_fetch(stub: DeliveryReportServiceAsyncStub, ledger: Ledger, rng: random.Random) -> None:
    """A sample of the acknowledged reports, fetched from the restarted server."""
    sample = rng.sample(sorted(ledger.acked), min(FETCH_SAMPLE, len(ledger.acked)))
    for message_id in sample:
        fetched = await stub.GetMessage(GetMessageRequest(message_id=message_id), timeout=TIMEOUT)
        [state] = fetched.messages
        assert state.message_id == message_id
        assert json.loads(state.raw_payload) == ledger.sent[message_id]


async def test_acknowledged_reports_survive_sigkill_and_the_stream_resumes_without_gaps(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    db = tmp_path / "crash.db"
    ledger = Ledger()
    previous_max = 0
    servers: list[launcher.Server] = []
    try:
        for round_number in range(ROUNDS):
            server = await asyncio.to_thread(launcher.start, db)
            servers.append(server)
            life = Round()
            channel = grpc.aio.insecure_channel(server.address)
            try:
                stub: DeliveryReportServiceAsyncStub = DeliveryReportServiceStub(channel)
                await check_fetch(stub, ledger, rng)
                acked_before = set(ledger.acked)
                consumer = asyncio.create_task(consume(stub, ledger, life))
                writers = [
                    asyncio.create_task(
                        write(stub, ledger, random.Random(rng.random()), f"r{round_number}w{index}", life)
                    )
                    for index in range(WRITERS)
                ]
                # The kill comes at a random moment once the load is flowing and the stream is live
                # (on a busy machine, starting up alone can take longer than the shortest wait).
                await asyncio.wait_for(asyncio.gather(life.acknowledged.wait(), life.streaming.wait()), 20)
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                life.killed.set()
                await asyncio.to_thread(server.stop, signal.SIGKILL, 10)
                await asyncio.wait_for(asyncio.gather(consumer, *writers), 20)
            finally:
                await channel.close(None)
            assert not ledger.unexpected, ledger.unexpected
            round_acked = set(ledger.acked) - acked_before
            assert round_acked, "no Ingest was acknowledged before the kill: the round proved nothing"
            stored = read_copy(db, tmp_path / f"round-{round_number}")
            check_stored(stored, ledger, previous_max, round_acked)
            previous_max = stored.changes[-1][0]

        # A last start: the consumer catches up on everything, then the server stops gracefully.
        server = await asyncio.to_thread(launcher.start, db)
        servers.append(server)
        channel = grpc.aio.insecure_channel(server.address)
        try:
            stub = DeliveryReportServiceStub(channel)
            await check_fetch(stub, ledger, rng)
            await asyncio.wait_for(consume(stub, ledger, Round(), until=previous_max), 20)
        finally:
            await channel.close(None)
        assert not ledger.unexpected, ledger.unexpected
        assert await asyncio.to_thread(server.stop, signal.SIGTERM, 15) == 0
    finally:
        for running in servers:
            running.stop(signal.SIGKILL, 10)

    final = read_db(db)
    check_stored(final, ledger, 0, set())
    assert ledger.seen == final.changes  # the union of every round's stream: all of it, in order, once
    assert len(ledger.acked) >= ROUNDS * WRITERS
