"""Retention (issue #13 point 5): final messages older than the retention are pruned with their
history and raw text, by a periodic task and by PruneMessages (`dlrhub prune`), a small batch per
transaction while Ingest is served; a Stream resumed before a pruned change is OUT_OF_RANGE with the
oldest cursor it may resume from; quarantined items are dismissed by id or by age (RPC and CLI), and
the open-quarantine gauge drops."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, GmsStatusCodes, RawStatus
from deliveryreport.v1.delivery_report_service_pb2 import (
    DismissQuarantineRequest,
    GetMessageRequest,
    IngestRequest,
    ListQuarantineRequest,
    PruneMessagesRequest,
    StreamBatchesRequest,
    StreamRequest,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.feed.encoding import EncodedChange
from dlrhub.feed.follow import CursorPruned, Heartbeat, follow_batches
from dlrhub.merge import digest, merge
from dlrhub.store.base import ChangeFilter, Transaction
from dlrhub.write.retention import BATCH
from dlrhub_client import PermissionDeniedError
from tests.conftest import FakeClock, Running, serving
from tests.helpers import (
    ACCEPTED,
    GMS,
    TIMEOUT,
    S,
    connect,
    cursors_of,
    details_of,
    eventually,
    failure,
    gms,
    gms_payload,
    history_of,
    ingest,
    position,
    read_changes,
    read_message,
    read_start,
    run,
    scrape,
    stream_failure,
    value,
)

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub as Stub

pytestmark = pytest.mark.engines  # the server fixture (and `db`) on SQLite and PostgreSQL

DAY = 86_400
DLRHUB = shutil.which("dlrhub", path=str(Path(sys.executable).parent)) or "dlrhub"
ENV = {k: v for k, v in os.environ.items() if k not in {"DLRHUB_TARGET", "DLRHUB_TOKEN"}}
ADMIN_TOKEN = "admin-token-5e1f0c93"
BOTH_TOKEN = "both-token-0d7a61b2"


def days(count: float) -> Duration:
    return Duration(seconds=int(count * DAY))


async def not_found(stub: Stub, message_id: str) -> bool:
    try:
        await stub.GetMessage(GetMessageRequest(message_id=message_id), timeout=TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.NOT_FOUND
    return False


# --- pruning -------------------------------------------------------------------------------------


async def test_prune_removes_final_old_messages_with_their_history_and_nothing_else(server: Running) -> None:
    stub, clock = server.stub, server.clock
    await ingest(stub, gms_payload(gms("old-pending", "SENT")))
    await ingest(stub, gms_payload(gms("old-final", "SENT", seconds=1), gms("old-final", seconds=2)))
    clock.advance(10 * DAY)
    await ingest(stub, gms_payload(gms("recent-final", "UNDELIVERED")))

    pruned = await stub.PruneMessages(PruneMessagesRequest(older_than=days(7)), timeout=TIMEOUT)
    assert (pruned.message_count, pruned.report_count, pruned.quarantined_count) == (1, 2, 0)
    assert await not_found(stub, "old-final")
    assert [report.status for report in await history_of(stub, "old-pending")] == [S.DELIVERY_STATUS_SENT]
    assert len(await history_of(stub, "recent-final")) == 1
    # The raw text went with the history: the stream from the beginning holds only what is left,
    # old-pending's change too, though its cursor is below the pruned ones.
    call = stub.Stream(StreamRequest(from_beginning=True))
    try:
        assert await read_start(call) == 0
        changes = await read_changes(call, 2)
    finally:
        call.cancel()
    assert [change.change.report.message_id for change in changes] == ["old-pending", "recent-final"]
    store = server.app.store
    assert pruned.pruned_through_cursor == store.cursor_format.format(store.pruned_through())
    assert position(changes[0].cursor) < position(pruned.pruned_through_cursor) < position(changes[1].cursor)

    # A late report of a pruned message starts it afresh: it is new, not a duplicate.
    again = await ingest(stub, gms_payload(gms("old-final", seconds=2)))
    assert [result.outcome for result in again.results] == [ACCEPTED]
    assert len(await history_of(stub, "old-final")) == 1


async def test_a_prune_leaves_a_change_no_stream_could_read_yet(
    tmp_path: Path, clock: FakeClock, postgres_db: str
) -> None:
    """A change committed while an older transaction is open waits for it to reach Streams (README,
    "Scaling out"). A prune meanwhile deleted it unread: every live Stream skipped it silently."""
    async with (
        serving(tmp_path, clock=clock, db=postgres_db) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = DeliveryReportServiceStub(channel)
        call = stub.Stream(StreamRequest())
        try:
            await read_start(call)
            with psycopg.connect(postgres_db, autocommit=True) as other, other.transaction():
                other.execute("SELECT pg_current_xact_id()")
                sent = await ingest(stub, gms_payload(gms("held-back")))
                clock.advance(10 * DAY)
                pruned = await stub.PruneMessages(PruneMessagesRequest(older_than=days(7)), timeout=TIMEOUT)
                assert pruned.message_count == 0
            [change] = await read_changes(call, 1)
            # Read, it is pruned like any other.
            pruned = await stub.PruneMessages(PruneMessagesRequest(older_than=days(7)), timeout=TIMEOUT)
            assert pruned.message_count == 1
        finally:
            call.cancel()
    assert change.cursor == sent.results[0].cursor


async def test_prune_needs_a_positive_age_or_the_server_retention(server: Running) -> None:
    missing = await failure(server.stub.PruneMessages(PruneMessagesRequest(), timeout=TIMEOUT))
    assert (missing.code, missing.reason, missing.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_FIELD",
        ["older_than"],
    )
    for bad in (Duration(), Duration(seconds=-5)):
        request = PruneMessagesRequest(older_than=bad)
        invalid = await failure(server.stub.PruneMessages(request, timeout=TIMEOUT))
        assert (invalid.reason, invalid.fields) == ("INVALID_VALUE", ["older_than"])


async def test_with_retention_set_the_server_prunes_by_itself_and_on_request(
    tmp_path: Path, clock: FakeClock, db: str | Path
) -> None:
    # 10 s of retention: the task runs every second of real time, and prunes what the fake clock aged.
    async with (
        serving(tmp_path, clock=clock, db=db, retention=10) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub: Stub = DeliveryReportServiceStub(channel)
        await ingest(stub, gms_payload(gms("a"), gms("b", "SENT")))
        pruned = await stub.PruneMessages(PruneMessagesRequest(), timeout=TIMEOUT)
        assert pruned.message_count == 0  # unset: the server's retention, which "a" is within
        clock.advance(11)
        await eventually(lambda: not_found(stub, "a"), "the periodic prune of a", within=TIMEOUT * 2)
        assert len(await history_of(stub, "b")) == 1  # not final: kept


def old_delivered(tx: Transaction, count: int, received: int) -> None:
    """`count` delivered messages (one report each), received at `received` (Unix seconds)."""
    for number in range(count):
        report = DeliveryReport(
            source=GMS,
            message_id=f"bulk-{number}",
            channel=Channel.CHANNEL_SMS,
            status=S.DELIVERY_STATUS_DELIVERED,
            final=True,
            raw=RawStatus(gms=GmsStatusCodes(status=2, substatus=23, sent_via="sms")),
            received_time=Timestamp(seconds=received),
            raw_payload=f'{{"message_id": "bulk-{number}", "status": 2}}',
        )
        tx.append(report, digest(report), merge(None, report))


async def test_ingest_is_served_while_a_big_prune_runs_a_batch_per_transaction(server: Running) -> None:
    running, stub, clock = server.app, server.stub, server.clock
    total = 20_000
    await running.committer.run(lambda tx: old_delivered(tx, total, clock() // 1_000_000_000))
    clock.advance(2 * DAY)

    pruning = asyncio.create_task(running.retention.prune(DAY))
    served_meanwhile = 0
    number = 0
    while not pruning.done():
        response = await ingest(stub, gms_payload(gms(f"live-{number}")))
        assert [result.outcome for result in response.results] == [ACCEPTED]
        number += 1
        if not pruning.done():
            served_meanwhile += 1
    done = await pruning

    assert done.total.messages == done.total.reports == total
    per_transaction = [batch.messages for batch in done.transactions if batch.messages]
    assert max(per_transaction) == BATCH
    assert len(per_transaction) == total // BATCH
    # The writer took Ingest's groups between the prune's transactions.
    assert served_meanwhile >= 1
    for live in range(number):
        assert len(await history_of(stub, f"live-{live}")) == 1


# --- pruned cursors ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["Stream", "StreamBatches"])
async def test_a_stream_resumed_before_a_pruned_change_is_out_of_range_with_the_oldest_cursor(
    server: Running, method: str
) -> None:
    stub, clock = server.stub, server.clock
    [first] = (await ingest(stub, gms_payload(gms("gone-1")))).results
    [second] = (await ingest(stub, gms_payload(gms("gone-2")))).results
    clock.advance(10 * DAY)
    [kept] = (await ingest(stub, gms_payload(gms("kept-1")))).results
    pruned = await stub.PruneMessages(PruneMessagesRequest(older_than=days(1)), timeout=TIMEOUT)
    assert pruned.pruned_through_cursor == second.cursor

    def call(cursor: str) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
        request = StreamRequest(cursor=cursor)
        if method == "Stream":
            return stub.Stream(request)
        return stub.StreamBatches(StreamBatchesRequest(stream=request))

    for cursor in (server.app.store.cursor_format.format(0), first.cursor):
        details = await stream_failure(call(cursor))
        assert (details.code, details.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_PRUNED")
        assert details.metadata == {"cursor": cursor, "oldest_cursor": second.cursor}

    # From the oldest cursor on, nothing was pruned: the stream resumes.
    resumed = stub.Stream(StreamRequest(cursor=second.cursor))
    try:
        assert await read_start(resumed) == position(second.cursor)
        assert cursors_of(await read_changes(resumed, 1)) == [position(kept.cursor)]
    finally:
        resumed.cancel()


async def test_a_feed_catching_up_while_retention_prunes_ahead_of_it_ends_with_cursor_pruned(
    server: Running,
) -> None:
    running, clock = server.app, server.clock
    await running.committer.run(lambda tx: old_delivered(tx, 100, clock() // 1_000_000_000))
    clock.advance(2 * DAY)
    feed = cast(
        AsyncGenerator[list[EncodedChange] | Heartbeat, None],
        follow_batches(running.store, running.hub, asyncio.to_thread, ChangeFilter(), 0, 15.0, max_batch=10),
    )
    try:
        assert isinstance(await anext(feed), Heartbeat)
        first = await anext(feed)
        assert isinstance(first, list)
        assert len(first) == 10
        await running.retention.prune(DAY)  # deletes the 90 changes the feed has not read yet
        with pytest.raises(CursorPruned) as raised:
            await anext(feed)
    finally:
        await feed.aclose()
    assert raised.value.after == first[-1].cursor
    assert raised.value.oldest == running.store.pruned_through()


async def test_a_stream_that_is_catching_up_when_a_prune_runs_ends_out_of_range(server: Running) -> None:
    """Over gRPC: the stream stalls (flow control) with most of the history unread, a prune deletes it."""
    running, clock = server.app, server.clock
    await running.committer.run(lambda tx: old_delivered(tx, 5000, clock() // 1_000_000_000))
    clock.advance(2 * DAY)
    options = [("grpc.http2.bdp_probe", 0)]  # the window stays small: the server stalls soon
    async with grpc.aio.insecure_channel(server.address, options=options) as channel:
        stub: Stub = DeliveryReportServiceStub(channel)
        call = stub.Stream(StreamRequest(from_beginning=True))
        try:
            await read_start(call)
            await read_changes(call, 1)
            await running.retention.prune(DAY)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await read_to_the_end(call)  # what was read before the prune arrives, then the error
        finally:
            call.cancel()
    details = details_of(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_PRUNED")
    # Pruned through some batch of the prune (the feed may have read on while it ran), past the
    # last change delivered.
    oldest = position(details.metadata["oldest_cursor"])
    assert position(details.metadata["cursor"]) < oldest <= running.store.pruned_through()


async def read_to_the_end(call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
    """Reads a stream until it fails (an end without an error fails the test too)."""
    while True:
        await read_message(call)


# --- quarantine dismissal ------------------------------------------------------------------------


async def quarantine_junk(server: Running, *texts: str) -> list[int]:
    """Ingests each text (not JSON: quarantined whole), returns their quarantine ids."""
    for text in texts:
        with pytest.raises(grpc.aio.AioRpcError):
            await ingest(server.stub, text)
    listed = await server.stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT)
    return [item.id for item in listed.items]


async def open_gauge(running: app.App) -> float:
    await running.store_health.probe()  # the periodic count, now
    return value(await scrape(running.admin_port), "dlrhub_quarantine_open")


async def test_dismiss_by_id_and_by_age_closes_items_and_the_open_gauge_drops(server: Running) -> None:
    stub, clock = server.stub, server.clock
    first, second = await quarantine_junk(server, "junk one", "junk two")
    clock.advance(8 * DAY)
    [_, _, third] = await quarantine_junk(server, "junk three")
    assert await open_gauge(server.app) == 3

    by_id = await stub.DismissQuarantine(DismissQuarantineRequest(ids=[first]), timeout=TIMEOUT)
    assert (by_id.dismissed_count, by_id.open_count) == (1, 2)
    cut = Timestamp()
    cut.FromNanoseconds(clock() - 7 * DAY * 1_000_000_000)
    by_age = await stub.DismissQuarantine(DismissQuarantineRequest(received_before=cut), timeout=TIMEOUT)
    assert (by_age.dismissed_count, by_age.open_count) == (1, 1)
    assert await open_gauge(server.app) == 1

    listed = await stub.ListQuarantine(ListQuarantineRequest(include_resolved=True), timeout=TIMEOUT)
    dismissed = {item.id: item.HasField("dismissed_time") for item in listed.items}
    assert dismissed == {first: True, second: True, third: False}
    assert listed.open_count == 1
    # The same junk again after its dismissal is open again: it happens again.
    await quarantine_junk(server, "junk one")
    assert (await stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT)).open_count == 2

    # Dismissed items go when retention prunes them.
    clock.advance(2 * DAY)
    pruned = await stub.PruneMessages(PruneMessagesRequest(older_than=days(1)), timeout=TIMEOUT)
    assert pruned.quarantined_count == 2
    listed = await stub.ListQuarantine(ListQuarantineRequest(include_resolved=True), timeout=TIMEOUT)
    assert first not in {item.id for item in listed.items}
    assert len(listed.items) == 2


async def test_dismiss_refuses_unknown_ids_and_needs_exactly_one_selector(server: Running) -> None:
    [known] = await quarantine_junk(server, "junk")
    unknown = await failure(
        server.stub.DismissQuarantine(DismissQuarantineRequest(ids=[known, 999]), timeout=TIMEOUT)
    )
    assert (unknown.code, unknown.reason, unknown.metadata) == (
        grpc.StatusCode.NOT_FOUND,
        "QUARANTINED_ITEM_NOT_FOUND",
        {"ids": "999", "count": "1"},
    )
    assert (await server.stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT)).open_count == 1
    neither = await failure(server.stub.DismissQuarantine(DismissQuarantineRequest(), timeout=TIMEOUT))
    assert (neither.reason, neither.fields) == ("MISSING_FIELD", ["ids"])
    both = DismissQuarantineRequest(ids=[known], received_before=Timestamp(seconds=1))
    assert (await failure(server.stub.DismissQuarantine(both, timeout=TIMEOUT))).reason == "INVALID_VALUE"


# --- the CLI and the admin role ------------------------------------------------------------------


@pytest.fixture
async def secured(tmp_path: Path, clock: FakeClock, db: str | Path) -> AsyncIterator[Running]:
    tokens = f"admin:{ADMIN_TOKEN},ingest+read:{BOTH_TOKEN}"
    async with serving(tmp_path, clock=clock, db=db, tokens=tokens, webhooks_open=True) as running:
        address = f"127.0.0.1:{running.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            yield Running(running, DeliveryReportServiceStub(channel), channel, clock, address)


async def test_the_cli_dismisses_and_prunes_with_an_admin_token(secured: Running) -> None:
    metadata = (("authorization", f"Bearer {BOTH_TOKEN}"),)
    for text in ("junk one", "junk two", "junk three"):
        with pytest.raises(grpc.aio.AioRpcError):
            await secured.stub.Ingest(IngestRequest(payload=text), metadata=metadata, timeout=TIMEOUT)
    cli_report = IngestRequest(payload=gms_payload(gms("cli-1")))
    await secured.stub.Ingest(cli_report, metadata=metadata, timeout=TIMEOUT)
    listed = await secured.stub.ListQuarantine(ListQuarantineRequest(), metadata=metadata, timeout=TIMEOUT)
    first, second, third = (item.id for item in listed.items)
    target = ("--target", secured.address)

    # A token without the admin role may not; nothing was dismissed.
    dismiss = (DLRHUB, "quarantine", "dismiss")
    code, _, err = await run(*dismiss, str(first), *target, "--token", BOTH_TOKEN, env=ENV)
    assert code != 0
    assert "PERMISSION_DENIED" in err
    env = {**ENV, "DLRHUB_TOKEN": ADMIN_TOKEN}
    code, out, err = await run(*dismiss, str(first), str(second), *target, env=env)
    assert (code, out, err) == (0, "dismissed 2, still open 1\n", "")
    assert await open_gauge(secured.app) == 1

    secured.clock.advance(8 * DAY)
    code, out, _ = await run(*dismiss, "--older-than", "7d", *target, "--json", env=env)
    assert code == 0
    assert '"dismissed_count":1' in out
    assert await open_gauge(secured.app) == 0

    code, out, err = await run(DLRHUB, "prune", "--older-than", "7d", *target, env=env)
    assert code == 0, err
    assert out.startswith("pruned 1 messages (1 reports) and 2 quarantined items;")
    async with connect(secured.app, token=BOTH_TOKEN) as client:
        with pytest.raises(PermissionDeniedError):
            await client.prune_messages(timedelta(days=7))
    remaining = await secured.stub.ListQuarantine(
        ListQuarantineRequest(include_resolved=True), metadata=metadata, timeout=TIMEOUT
    )
    assert [item.id for item in remaining.items] == [third]

    code, _, err = await run(*dismiss, *target, env=env)
    assert code == 2
    assert "ids or --older-than" in err
