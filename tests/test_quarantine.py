"""The quarantine over the real server: ListQuarantine, RenormaliseQuarantine, migration 2, the CLI.

Rejected items (and whole payloads) are quarantined by Ingest and by the webhooks, listed oldest
first, and re-run through the current normaliser after a fix. A "fix" is simulated the way a
release ships one: the app is stopped and started again on the same database with a normaliser
that now accepts an item shape it used to reject (see `KeyedByReference`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
import sqlite_utils
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, Source
from deliveryreport.v1.delivery_report_service_pb2 import (
    Format,
    GetMessageRequest,
    IngestOutcome,
    IngestRequest,
    IngestResponse,
    ListQuarantineRequest,
    ListQuarantineResponse,
    QuarantinedItem,
    RenormaliseQuarantineRequest,
    RenormaliseQuarantineResponse,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from deliveryreport.v1.provider_formats_pb2 import GmsReport, GmsReports
from dlrhub import app as dlrhub_app
from dlrhub.config import Settings
from dlrhub.normalise import NormalisedItem, Normaliser
from dlrhub.store import SqliteStore, Store
from dlrhub.store.base import QuarantinedItem as StoredItem
from dlrhub.store.sqlite import MIGRATIONS, SCHEMA_VERSION, migrate
from dlrhub_client.payloads import batch
from tests.conftest import FakeClock, Running
from tests.helpers import TIMEOUT, details_of, failure, position
from tools import launcher

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub as Stub

    StreamCall = grpc.aio.UnaryStreamCall[StreamRequest, StreamResponse]

# The tests with a server run over SQLite and over PostgreSQL (conftest.py); the migrations are SQLite's.
pytestmark = pytest.mark.engines

T0 = FakeClock().now_ns // 1_000_000_000  # the FakeClock's start, in whole seconds
# The samples arrive this far into their seconds: received times are kept to the nanosecond.
FRACTION_NS = 250_000_001
ACCEPTED = IngestOutcome.INGEST_OUTCOME_ACCEPTED
REJECTED = IngestOutcome.INGEST_OUTCOME_REJECTED
GMS = Format.FORMAT_GMS
SSR = Format.FORMAT_SENT_SMS_REPORT
UNSPECIFIED = Format.FORMAT_UNSPECIFIED

# --- payloads (odd spacing on purpose: the quarantine keeps an item's text byte for byte) ----------

GMS_OK = (
    '{"message_id": "q-gms-ok", "status": 2, "substatus": 23, "hyber_status": 23011, "time": 1477417294667}'
)
# No message_id: rejected today; the "fixed" normaliser keys it by its extra_id.
GMS_NO_ID = '{"extra_id": "q-gms-ref",   "status": 2, "substatus": 23, "time": 1477417294667}'
# No status: rejected by both releases.
GMS_NO_STATUS = '{"message_id": "q-gms-nostatus",  "time": 1477417294667}'
GMS_BATCH = f"[{GMS_OK},\n  {GMS_NO_ID}, {GMS_NO_STATUS}]"
GMS_REQUEST_ID = "q-gms-batch-1"

SSR_OK = (
    '{"messageId": "q-ssr-ok", "to": "41793026727", "doneAt": "2019-11-09T16:00:00.000+0000",'
    ' "status": {"groupId": 3, "id": 5}}'
)
# No messageId: rejected today; the "fixed" normaliser keys it by its callbackData.
SSR_NO_ID = (
    '{"callbackData": "q-ssr-ref",  "to": "41793026727", "doneAt": "2019-11-09T16:00:00.000+0000",'
    ' "status": {"groupId": 3, "id": 5}}'
)
SSR_BATCH = f'{{"results": [{SSR_OK}, {SSR_NO_ID}]}}'

NOT_JSON = '{"results": [{"messageId": "x",'
UNKNOWN_SHAPE = '{"hello": "world"}'


@dataclass(frozen=True)
class Expected:
    """What ListQuarantine must show for one quarantined item."""

    raw: str
    format: Format.ValueType
    whole_payload: bool
    field: str
    reason: str
    received_seconds: int
    request_id: str = ""


# The quarantine after `ingest_samples`, oldest first.
SAMPLES = [
    Expected(GMS_NO_ID, GMS, False, "[1].message_id", "MISSING_FIELD", T0, GMS_REQUEST_ID),
    Expected(GMS_NO_STATUS, GMS, False, "[2].status", "MISSING_FIELD", T0, GMS_REQUEST_ID),
    Expected(SSR_NO_ID, SSR, False, "results[1].messageId", "MISSING_FIELD", T0 + 10),
    Expected(NOT_JSON, UNSPECIFIED, True, "", "INVALID_JSON", T0 + 20),
    Expected(UNKNOWN_SHAPE, UNSPECIFIED, True, "", "UNKNOWN_FORMAT", T0 + 30),
]
GMS_NO_ID_AT, GMS_NO_STATUS_AT, SSR_NO_ID_AT, NOT_JSON_AT, UNKNOWN_SHAPE_AT = range(5)


# --- helpers -------------------------------------------------------------------------------------


async def ingest(stub: Stub, request: IngestRequest) -> IngestResponse:
    return await asyncio.wait_for(stub.Ingest(request), TIMEOUT)


async def ingest_rejected(stub: Stub, request: IngestRequest) -> None:
    """An Ingest with nothing usable: INVALID_ARGUMENT (and quarantined all the same)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ingest(stub, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def ingest_samples(stub: Stub, clock: FakeClock) -> None:
    """Ingests the payloads behind SAMPLES, 10 s apart, starting at T0 + FRACTION_NS."""
    assert clock.now_ns == T0 * 1_000_000_000
    clock.now_ns += FRACTION_NS
    response = await ingest(stub, IngestRequest(payload=GMS_BATCH, request_id=GMS_REQUEST_ID))
    assert [r.outcome for r in response.results] == [ACCEPTED, REJECTED, REJECTED]
    clock.advance(10)
    response = await ingest(stub, IngestRequest(payload=SSR_BATCH))
    assert [r.outcome for r in response.results] == [ACCEPTED, REJECTED]
    clock.advance(10)
    await ingest_rejected(stub, IngestRequest(payload=NOT_JSON))
    clock.advance(10)
    await ingest_rejected(stub, IngestRequest(payload=UNKNOWN_SHAPE))


async def list_quarantine(stub: Stub, request: ListQuarantineRequest) -> ListQuarantineResponse:
    return await asyncio.wait_for(stub.ListQuarantine(request), TIMEOUT)


async def all_quarantined(stub: Stub, *, include_resolved: bool = False) -> list[QuarantinedItem]:
    response = await list_quarantine(stub, ListQuarantineRequest(include_resolved=include_resolved))
    assert not response.next_page_token
    return list(response.items)


async def renormalise(stub: Stub, ids: Sequence[int] = ()) -> RenormaliseQuarantineResponse:
    return await asyncio.wait_for(stub.RenormaliseQuarantine(RenormaliseQuarantineRequest(ids=ids)), TIMEOUT)


async def fetch_one(stub: Stub, message_id: str) -> tuple[DeliveryReport, list[DeliveryReport]]:
    """The state of a message and its history."""
    request = GetMessageRequest(message_id=message_id, include_history=True)
    response = await asyncio.wait_for(stub.GetMessage(request), TIMEOUT)
    assert len(response.messages) == 1
    return response.messages[0], list(response.history)


def assert_listed(item: QuarantinedItem, expected: Expected) -> None:
    assert item.raw == expected.raw
    assert item.format == expected.format
    assert item.whole_payload is expected.whole_payload
    assert item.error.field == expected.field
    assert item.error.reason == expected.reason
    assert item.error.description
    assert item.received_time.seconds == expected.received_seconds
    assert item.received_time.nanos == FRACTION_NS
    assert item.request_id == expected.request_id
    assert not item.HasField("resolved_time")


def quarantine_count(store: Store) -> int:
    """Quarantined items kept, open or resolved."""
    return len(store.quarantined(0, 10_000))


_REFERENCE_OF = {"message_id": "extra_id", "messageId": "callbackData"}


class KeyedByReference(Normaliser):
    """The "fixed" normaliser release: a report without a message id is keyed by its sender reference.

    GMS `message_id` falls back to `extra_id`, SentSMSReport `messageId` to `callbackData`, so the
    GMS_NO_ID and SSR_NO_ID items, rejected before, now normalise; everything else is unchanged.
    """

    def normalise(
        self,
        payload: str,
        format: Format.ValueType,
        received: Timestamp,
        *,
        default_channel: Channel.ValueType = Channel.CHANNEL_SMS,
        max_items: int | None = None,
    ) -> list[NormalisedItem]:
        items = super().normalise(
            payload, format, received, default_channel=default_channel, max_items=max_items
        )
        return [self._keyed(item, received) for item in items]

    def _keyed(self, item: NormalisedItem, received: Timestamp) -> NormalisedItem:
        """The item read again with its reference as its message id, if that is all it lacked."""
        rejection = item.rejection
        key = rejection.field.rpartition(".")[2] if rejection is not None else ""
        if rejection is None or rejection.reason != ErrorReason.MISSING_FIELD or key not in _REFERENCE_OF:
            return item
        fields = json.loads(item.raw)
        if not fields.get(_REFERENCE_OF[key]):
            return item
        fields[key] = fields[_REFERENCE_OF[key]]
        format = Format.ValueType(item.format)
        [keyed] = super().normalise(batch(format, [json.dumps(fields)]), format, received)
        if keyed.report is None:
            return item
        keyed.report.raw_payload = item.raw  # the item's own text, as it came
        return replace(keyed, index=item.index, raw=item.raw)


@dataclass
class OwnApp:
    app: dlrhub_app.App
    stub: Stub


@asynccontextmanager
async def own_app(
    db: str | Path, clock: FakeClock, normaliser: Normaliser | None = None
) -> AsyncIterator[OwnApp]:
    """A dlrhub of the test's own (to stop and start it again on the same database), with the
    release's normaliser, or another one."""
    running = await dlrhub_app.start(
        Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=db, shutdown_grace=1.0),
        normaliser=normaliser,
        clock=clock,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield OwnApp(running, DeliveryReportServiceStub(channel))
    finally:
        await channel.close(None)
        await running.stop()


async def read_change(call: StreamCall) -> StreamResponse:
    """The next change (the 15 s default heartbeat never fires within these tests)."""
    message = await asyncio.wait_for(call.read(), TIMEOUT)
    assert isinstance(message, StreamResponse), "the stream ended"
    assert not message.HasField("heartbeat")
    return message


# --- ListQuarantine ------------------------------------------------------------------------------


async def test_list_quarantine_shows_every_rejected_item_and_payload(server: Running) -> None:
    await ingest_samples(server.stub, server.clock)
    # Typed reports: the path is that of the GMS array they mirror.
    server.clock.advance(10)
    typed = GmsReports(
        reports=[GmsReport(message_id="q-typed-ok", status=2), GmsReport(extra_id="q-typed-ref")]
    )
    response = await ingest(server.stub, IngestRequest(gms=typed))
    assert [r.outcome for r in response.results] == [ACCEPTED, REJECTED]
    # The webhooks quarantine the same way, under the route's format.
    server.clock.advance(10)
    hook_batch = '[{"message_id": "q-hook-ok", "status": 2}, {"status": 2,  "extra_id": "q-hook-ref"}]'
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.app.http_port}") as http:
        answer = await http.post("/webhooks/gms", content=hook_batch)
        assert answer.status_code == 400
        assert answer.json()["rejected"] == 1
        server.clock.advance(10)
        answer = await http.post("/webhooks/sent-sms-report", content=NOT_JSON)
        assert answer.status_code == 400
        assert answer.json()["error"]["reason"] == "INVALID_JSON"

    response_page = await list_quarantine(server.stub, ListQuarantineRequest())
    items = list(response_page.items)
    assert not response_page.next_page_token
    assert response_page.open_count == len(items) == len(SAMPLES) + 3
    ids = [item.id for item in items]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for item, expected in zip(items, SAMPLES, strict=False):
        assert_listed(item, expected)

    typed_item, hook_item, hook_payload = items[len(SAMPLES) :]
    assert json.loads(typed_item.raw) == {"extra_id": "q-typed-ref"}
    assert (typed_item.format, typed_item.whole_payload) == (GMS, False)
    assert (typed_item.error.field, typed_item.error.reason) == ("[1].message_id", "MISSING_FIELD")
    assert typed_item.received_time.seconds == T0 + 40
    hook_raw = '{"status": 2,  "extra_id": "q-hook-ref"}'
    assert_listed(hook_item, Expected(hook_raw, GMS, False, "[1].message_id", "MISSING_FIELD", T0 + 50))
    assert_listed(hook_payload, Expected(NOT_JSON, SSR, True, "", "INVALID_JSON", T0 + 60))

    # The accepted items of the same batches were stored as usual.
    for message_id in ("q-gms-ok", "q-ssr-ok", "q-typed-ok", "q-hook-ok"):
        state, _ = await fetch_one(server.stub, message_id)
        assert state.message_id == message_id


async def test_list_quarantine_pages(server: Running) -> None:
    await ingest_samples(server.stub, server.clock)
    everything = await all_quarantined(server.stub)
    assert len(everything) == len(SAMPLES)

    paged: list[QuarantinedItem] = []
    token = ""
    for _ in range(len(SAMPLES) + 1):
        page = await list_quarantine(server.stub, ListQuarantineRequest(page_size=1, page_token=token))
        assert len(page.items) == 1
        assert page.open_count == len(SAMPLES)
        paged.extend(page.items)
        token = page.next_page_token
        if not token:
            break
    assert paged == everything

    # A page size over the cap is capped, not refused.
    big = await list_quarantine(server.stub, ListQuarantineRequest(page_size=1_000_000))
    assert list(big.items) == everything

    for bad in (ListQuarantineRequest(page_size=-1), ListQuarantineRequest(page_token="not-a-token")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await list_quarantine(server.stub, bad)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A token of the open-only listing does not continue the listing with resolved items.
    first = await list_quarantine(server.stub, ListQuarantineRequest(page_size=1))
    other = ListQuarantineRequest(page_size=1, page_token=first.next_page_token, include_resolved=True)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await list_quarantine(server.stub, other)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- RenormaliseQuarantine -----------------------------------------------------------------------


async def test_renormalise_with_nothing_fixed_changes_nothing(server: Running) -> None:
    await ingest_samples(server.stub, server.clock)
    before = await all_quarantined(server.stub, include_resolved=True)
    latest = server.app.store.latest_cursor()
    assert quarantine_count(server.app.store) == len(SAMPLES)

    for _ in range(2):  # a second run neither resolves nor quarantines anything again
        server.clock.advance(100)
        response = await renormalise(server.stub)
        assert [result.id for result in response.results] == [item.id for item in before]
        assert response.resolved_count == 0
        assert response.still_rejected_count == len(SAMPLES)
        for result, item in zip(response.results, before, strict=True):
            assert not result.resolved
            assert len(result.results) == 1, "one outcome per item, not the replay of its batch"
            (outcome,) = result.results
            assert outcome.outcome == REJECTED
            assert outcome.error.reason == item.error.reason
            assert not outcome.HasField("report")
            assert not outcome.cursor

        assert quarantine_count(server.app.store) == len(SAMPLES)
        assert server.app.store.latest_cursor() == latest
        listing = await list_quarantine(server.stub, ListQuarantineRequest(include_resolved=True))
        assert list(listing.items) == before
        assert listing.open_count == len(SAMPLES)


async def test_a_rejected_xml_report_is_run_again_as_xml(server: Running) -> None:
    # A GMS XML callback is one report, not an element of a batch: it is re-run as it came, not in "[...]".
    xml = "<DeliveryReport><status>2</status><last_partner>sms</last_partner></DeliveryReport>"
    await ingest_rejected(server.stub, IngestRequest(payload=xml))
    [item] = await all_quarantined(server.stub)
    assert (item.error.field, item.error.reason) == ("message_id", "MISSING_FIELD")
    assert (item.raw, item.format, item.whole_payload) == (xml, GMS, False)

    result = (await renormalise(server.stub)).results[0]
    assert not result.resolved
    assert [(r.error.field, r.error.reason) for r in result.results] == [("message_id", "MISSING_FIELD")]


async def test_renormalise_with_an_unknown_id_is_not_found_and_runs_nothing(
    db: str | Path, clock: FakeClock
) -> None:
    async with own_app(db, clock) as old_release:
        await ingest_samples(old_release.stub, clock)
        items = await all_quarantined(old_release.stub)
    gms_id = items[GMS_NO_ID_AT].id
    unknown = max(item.id for item in items) + 1000

    # The GMS item would now pass.
    async with own_app(db, clock, KeyedByReference.load()) as new_release:
        stub, store = new_release.stub, new_release.app.store
        latest = store.latest_cursor()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await renormalise(stub, [gms_id, unknown, unknown])
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"no quarantined item with id {unknown};" in (raised.value.details() or "")
        details = details_of(raised.value)
        assert details.reason == "QUARANTINED_ITEM_NOT_FOUND"
        assert details.metadata == {"ids": str(unknown), "count": "1"}
        # Nothing was run: the known item is still open and nothing was stored.
        assert await all_quarantined(stub) == items
        assert store.latest_cursor() == latest

        # A resolved item's id is known: it is skipped, not refused.
        assert (await renormalise(stub, [gms_id])).resolved_count == 1
        again = await renormalise(stub, [gms_id])
        assert list(again.results) == []


async def test_renormalise_after_a_fix_stores_what_now_passes(db: str | Path, clock: FakeClock) -> None:
    async with own_app(db, clock) as old_release:
        await ingest_samples(old_release.stub, clock)
        items = await all_quarantined(old_release.stub)
    ids = [item.id for item in items]
    gms_id, ssr_id, unknown_id = ids[GMS_NO_ID_AT], ids[SSR_NO_ID_AT], ids[UNKNOWN_SHAPE_AT]
    still_open = [ids[GMS_NO_STATUS_AT], ids[NOT_JSON_AT], unknown_id]

    # The new release: same database, a normaliser that now accepts the two items without an id.
    clock.advance(1000)
    fixed_at = clock.now_ns // 1_000_000_000
    async with own_app(db, clock, KeyedByReference.load()) as new_release:
        stub, store = new_release.stub, new_release.app.store
        assert await all_quarantined(stub) == items  # the quarantine survived the restart
        start = store.latest_cursor()
        call: StreamCall = stub.Stream(StreamRequest())
        try:
            first = await asyncio.wait_for(call.read(), TIMEOUT)
            assert isinstance(first, StreamResponse)
            assert first.HasField("heartbeat")
            assert position(first.cursor) == start

            # By explicit ids: only those are run, in id order.
            response = await renormalise(stub, [unknown_id, gms_id])
            assert [result.id for result in response.results] == [gms_id, unknown_id]
            assert (response.resolved_count, response.still_rejected_count) == (1, 1)
            resolved, rejected = response.results
            assert resolved.resolved
            assert [r.outcome for r in resolved.results] == [ACCEPTED]
            assert resolved.results[0].message_id == "q-gms-ref"
            assert not resolved.results[0].HasField("report")  # the BASIC view
            assert not rejected.resolved
            assert [(r.outcome, r.error.reason) for r in rejected.results] == [(REJECTED, "UNKNOWN_FORMAT")]

            message = await read_change(call)
            assert message.cursor == resolved.results[0].cursor
            assert position(message.cursor) > start
            assert message.change.report.message_id == "q-gms-ref"
            assert message.change.report.raw_payload == GMS_NO_ID
            assert message.change.report.received_time == Timestamp(seconds=T0, nanos=FRACTION_NS)
            assert message.change.state.message_id == "q-gms-ref"

            # Every open item: the resolved one is not run again.
            response = await renormalise(stub)
            assert [result.id for result in response.results] == [i for i in ids if i != gms_id]
            assert (response.resolved_count, response.still_rejected_count) == (1, 3)
            by_id = {result.id: result for result in response.results}
            assert by_id[ssr_id].resolved
            assert [r.outcome for r in by_id[ssr_id].results] == [ACCEPTED]
            assert [result.id for result in response.results if not result.resolved] == still_open

            message = await read_change(call)
            assert message.change.report.message_id == "q-ssr-ref"
            assert message.change.report.raw_payload == SSR_NO_ID
            assert message.change.report.received_time == Timestamp(seconds=T0 + 10, nanos=FRACTION_NS)
            assert message.cursor == by_id[ssr_id].results[0].cursor

            # Stored like any Ingest, with the original received time and the item's own text.
            for message_id, raw, received, source in (
                ("q-gms-ref", GMS_NO_ID, T0, Source.SOURCE_GMS),
                ("q-ssr-ref", SSR_NO_ID, T0 + 10, Source.SOURCE_SENT_SMS_REPORT),
            ):
                state, history = await fetch_one(stub, message_id)
                assert (state.source, state.reference) == (source, message_id)
                assert state.received_time == Timestamp(seconds=received, nanos=FRACTION_NS)
                assert len(history) == 1
                assert history[0].raw_payload == raw
                assert history[0].received_time == state.received_time

            # Resolved items leave the open listing and show their resolution time in the full one.
            listing = await list_quarantine(stub, ListQuarantineRequest())
            assert [item.id for item in listing.items] == still_open
            assert listing.open_count == 3
            full = await all_quarantined(stub, include_resolved=True)
            assert [item.id for item in full] == ids
            for item, before in zip(full, items, strict=True):
                if item.id in (gms_id, ssr_id):
                    assert item.resolved_time.seconds == fixed_at
                    item.ClearField("resolved_time")
                else:
                    assert not item.HasField("resolved_time")
                assert item == before  # otherwise unchanged, reason and all

            # Again: nothing left to resolve, and nothing stored twice.
            latest = store.latest_cursor()
            assert [change.cursor for change in store.changes(start, 100)] == [
                position(resolved.results[0].cursor),
                position(by_id[ssr_id].results[0].cursor),
            ]
            response = await renormalise(stub)
            assert [result.id for result in response.results] == still_open
            assert (response.resolved_count, response.still_rejected_count) == (0, 3)
            response = await renormalise(stub, [gms_id, ssr_id])
            assert list(response.results) == []
            assert (response.resolved_count, response.still_rejected_count) == (0, 0)
            assert store.latest_cursor() == latest
            assert quarantine_count(store) == len(SAMPLES)
            for message_id in ("q-gms-ref", "q-ssr-ref"):
                _, history = await fetch_one(stub, message_id)
                assert len(history) == 1
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(call.read(), 0.3)  # no further change
        finally:
            call.cancel()


async def test_too_many_renormalise_ids_is_invalid_argument(server: Running) -> None:
    request = RenormaliseQuarantineRequest(ids=range(1, 10_002))
    details = await failure(server.stub.RenormaliseQuarantine(request))
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_IDS")


async def test_a_rejected_gms_batch_item_stays_rejected_when_re_run_unchanged(server: Running) -> None:
    payload = '[{"message_id": "ok", "status": 2}, [{"message_id": "nested", "status": 2}]]'
    answer = await server.stub.Ingest(IngestRequest(payload=payload))
    assert [r.outcome for r in answer.results] == [ACCEPTED, REJECTED]
    rerun = await server.stub.RenormaliseQuarantine(RenormaliseQuarantineRequest())
    assert (rerun.resolved_count, rerun.still_rejected_count) == (0, 1)
    assert rerun.results[0].results[0].error.reason == "WRONG_TYPE"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.GetMessage(GetMessageRequest(message_id="nested"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# --- schema migration ----------------------------------------------------------------------------


def create_version_1(db: Path) -> None:
    """A database as the first release left it (migration 1 only), with a quarantined item."""
    connection = sqlite3.connect(db, isolation_level=None)
    try:
        MIGRATIONS[0](sqlite_utils.Database(connection))
        connection.execute("PRAGMA user_version = 1")
        connection.execute(
            "INSERT INTO quarantine (received_seconds, request_id, field, reason, description, raw)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                1_600_000_000,
                "old-request",
                "[0].status",
                "INVALID_VALUE",
                "rejected by the first release",
                '{"message_id": "q-old-1", "status": 2,  "time": 1477417294667}',
            ),
        )
    finally:
        connection.close()


def test_a_version_2_database_is_migrated(db_path: Path) -> None:
    """The second release's quarantine rows (format, kind, resolution) survive migration 3 as they were."""
    connection = sqlite3.connect(db_path, isolation_level=None)
    try:
        for migration in MIGRATIONS[:2]:
            migration(sqlite_utils.Database(connection))
        connection.execute("PRAGMA user_version = 2")
        connection.execute(
            "INSERT INTO quarantine (received_seconds, request_id, field, reason, description, raw, format,"
            " whole_payload, resolved_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (1_650_000_000, "v2-request", "", "INVALID_JSON", "not JSON", NOT_JSON, SSR, 1, 1_650_000_100),
        )
    finally:
        connection.close()

    store = SqliteStore(db_path)
    try:
        assert user_version(db_path) == SCHEMA_VERSION
        ((_, item),) = store.quarantined(0, 10)
        assert item == StoredItem(
            raw=NOT_JSON,
            field="",
            reason="INVALID_JSON",
            description="not JSON",
            received_seconds=1_650_000_000,
            request_id="v2-request",
            format=SSR,
            whole_payload=True,
            resolved_seconds=1_650_000_100,
            received_nanos=0,  # not known for rows of older releases
        )
    finally:
        store.close()


def user_version(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return version


async def test_a_version_1_database_is_migrated(db_path: Path, clock: FakeClock) -> None:
    create_version_1(db_path)
    assert user_version(db_path) == 1

    store = SqliteStore(db_path)
    try:
        assert user_version(db_path) == SCHEMA_VERSION
        ((quarantine_id, old),) = store.quarantined(0, 10)
        assert (old.format, old.whole_payload, old.resolved_seconds) == (0, False, None)
        assert old.received_nanos == 0  # not known for rows of older releases
        assert (old.request_id, old.reason, old.received_seconds) == (
            "old-request",
            "INVALID_VALUE",
            1_600_000_000,
        )
        assert store.open_quarantine_count() == 1
    finally:
        store.close()
    with sqlite3.connect(db_path) as connection:
        assert migrate(connection) == SCHEMA_VERSION  # already current: nothing to do

    async with own_app(db_path, clock) as running:
        listing = await list_quarantine(running.stub, ListQuarantineRequest())
        assert listing.open_count == 1
        (item,) = listing.items
        assert item.id == quarantine_id
        assert (item.format, item.whole_payload) == (UNSPECIFIED, False)
        assert (item.request_id, item.error.field, item.error.reason) == (
            "old-request",
            "[0].status",
            "INVALID_VALUE",
        )
        assert item.received_time.seconds == 1_600_000_000
        assert not item.HasField("resolved_time")

        # An old row (format unknown) is read by its shape, and the current release accepts it.
        response = await renormalise(running.stub)
        assert response.resolved_count == 1
        assert [r.outcome for r in response.results[0].results] == [ACCEPTED]
        state, _ = await fetch_one(running.stub, "q-old-1")
        assert state.received_time.seconds == 1_600_000_000
        assert (await list_quarantine(running.stub, ListQuarantineRequest())).open_count == 0


# --- CLI -----------------------------------------------------------------------------------------

_SCRIPT = shutil.which("dlrhub", path=str(Path(sys.executable).parent))
DLRHUB = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "dlrhub.cli"]
ENV = {k: v for k, v in os.environ.items() if k not in {"DLRHUB_TARGET", "DLRHUB_TOKEN"}}


def dlrhub(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DLRHUB, *args], capture_output=True, text=True, timeout=30, env=ENV, check=False)


def test_cli_lists_and_renormalises(server_process: launcher.Server) -> None:
    with grpc.insecure_channel(server_process.address) as channel:
        stub = DeliveryReportServiceStub(channel)
        response = stub.Ingest(IngestRequest(payload=GMS_BATCH), timeout=TIMEOUT)
        assert response.rejected_count == 2
        with pytest.raises(grpc.RpcError) as raised:
            stub.Ingest(IngestRequest(payload=UNKNOWN_SHAPE), timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        items = list(stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT).items)
    assert [item.error.reason for item in items] == ["MISSING_FIELD", "MISSING_FIELD", "UNKNOWN_FORMAT"]

    target = ("--target", server_process.address)
    commands = [("quarantine", *target), ("quarantine", *target, "--json"), ("renormalise", *target)]
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        table, lines, rerun = pool.map(lambda command: dlrhub(*command), commands)

    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:6] == ["ID", "RECEIVED", "FORMAT", "STATE", "FIELD", "REASON"]
    assert len(rows) == len(items)
    for row, item in zip(rows, items, strict=True):
        cells = row.split()
        assert cells[0] == str(item.id)
        assert cells[2] == ("gms" if item.format == GMS else "unspecified")
        assert cells[3] == "open"
        assert item.error.reason in cells

    assert lines.returncode == 0, lines.stderr
    listed = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [int(entry["id"]) for entry in listed] == [item.id for item in items]
    assert [entry["error"]["reason"] for entry in listed] == [item.error.reason for item in items]
    assert [entry["raw"] for entry in listed] == [GMS_NO_ID, GMS_NO_STATUS, UNKNOWN_SHAPE]
    assert listed[2]["whole_payload"] is True

    assert rerun.returncode == 3, rerun.stderr
    assert rerun.stdout.count("still rejected") == len(items) + 1  # one line per item, and the total
    assert "resolved 0, still rejected 3" in rerun.stdout
    for item in items:
        assert f"{item.id}: still rejected" in rerun.stdout
