"""#19.11 over the real server: a provider retrying the same partly bad batch makes one open
quarantined item, counted, not one per retry; after a fix resolves it, the same item is new again.

The "fix" is an operator's GMS code table that maps an error code the shipped table does not: the
app is started again on the same database with it (and without it, to break it again).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_service_pb2 import (
    IngestOutcome,
    IngestRequest,
    ListQuarantineRequest,
    QuarantinedItem,
    RenormaliseQuarantineRequest,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from tests.conftest import FakeClock, serving

# Each test runs over SQLite and over PostgreSQL (conftest.py).
pytestmark = pytest.mark.engines

TIMEOUT = 10.0
ACCEPTED = IngestOutcome.INGEST_OUTCOME_ACCEPTED
DUPLICATE = IngestOutcome.INGEST_OUTCOME_DUPLICATE
REJECTED = IngestOutcome.INGEST_OUTCOME_REJECTED
# A GMS campaign-status answer: the second item has no status and an error code only an operator's
# code table maps (GMS documents campaign items with an error code and no status).
BAD_ITEM = '{"message_id": "dedup-bad", "error_code": 99999, "time": 1477417294667}'
BATCH = f'{{"messages": [{{"message_id": "dedup-ok", "status": 2, "time": 1477417294667}}, {BAD_ITEM}]}}'


@asynccontextmanager
async def dlrhub(
    tmp_path: Path, db: str | Path, clock: FakeClock, **settings: Any
) -> AsyncIterator[tuple[app.App, Any]]:
    async with (
        serving(tmp_path, clock=clock, db=db, **settings) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield running, DeliveryReportServiceStub(channel)


async def listed(stub: Any, *, include_resolved: bool = False) -> list[QuarantinedItem]:
    response = await stub.ListQuarantine(
        ListQuarantineRequest(include_resolved=include_resolved), timeout=TIMEOUT
    )
    return list(response.items)


def at(clock: FakeClock) -> Timestamp:
    moment = Timestamp()
    moment.FromNanoseconds(clock.now_ns)
    return moment


async def test_a_retried_partly_bad_batch_is_one_counted_open_item(tmp_path: Path, db: str | Path) -> None:
    clock = FakeClock()
    async with dlrhub(tmp_path, db, clock) as (running, stub):
        first_at = at(clock)
        for attempt in range(20):
            response = await stub.Ingest(
                IngestRequest(payload=BATCH, request_id=f"try-{attempt}"), timeout=TIMEOUT
            )
            expected = [ACCEPTED if attempt == 0 else DUPLICATE, REJECTED]
            assert [result.outcome for result in response.results] == expected
            last_at = at(clock)
            clock.advance(30.5)
        # The webhook's retries of the same item count on the same row.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}") as http:
            answer = await http.post("/webhooks/gms", content=BATCH)
            assert answer.status_code == 400
            last_at = at(clock)

        [item] = await listed(stub)
        assert item.raw == BAD_ITEM
        assert (item.error.field, item.error.reason) == ("messages[1].status", "MISSING_FIELD")
        assert item.received_count == 21
        assert item.received_time == first_at
        assert item.last_received_time == last_at
        assert item.request_id == "try-0"  # the first time it came
        response = await stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT)
        assert response.open_count == 1

        # Another item of the same batch shape is another item.
        other = BATCH.replace("dedup-bad", "dedup-bad-2")
        await stub.Ingest(IngestRequest(payload=other), timeout=TIMEOUT)
        assert [(i.raw, i.received_count) for i in await listed(stub)] == [
            (BAD_ITEM, 21),
            (BAD_ITEM.replace("dedup-bad", "dedup-bad-2"), 1),
        ]


async def test_once_resolved_the_same_item_is_open_again_as_a_new_item(
    tmp_path: Path, db: str | Path
) -> None:
    clock = FakeClock()
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({"rules": [{"when": {"error_code": 99999}, "status": "FAILED"}]}))
    async with dlrhub(tmp_path, db, clock) as (_, stub):
        for _ in range(3):
            await stub.Ingest(IngestRequest(payload=BATCH), timeout=TIMEOUT)
            clock.advance(1)
        [item] = await listed(stub)
        assert item.received_count == 3

    # The fix: a code table that maps the error code. The counted item resolves once.
    async with dlrhub(tmp_path, db, clock, gms_codes=codes) as (_, stub):
        response = await stub.RenormaliseQuarantine(RenormaliseQuarantineRequest(), timeout=TIMEOUT)
        assert (response.resolved_count, response.still_rejected_count) == (1, 0)
        assert [r.outcome for r in response.results[0].results] == [ACCEPTED]

    # Without it again, the same item is rejected again: a new open item, not the resolved one.
    clock.advance(60)
    async with dlrhub(tmp_path, db, clock) as (_, stub):
        await stub.Ingest(IngestRequest(payload=BATCH), timeout=TIMEOUT)
        resolved, reopened = await listed(stub, include_resolved=True)
        assert (resolved.id, resolved.received_count, resolved.HasField("resolved_time")) == (
            item.id,
            3,
            True,
        )
        assert (reopened.raw, reopened.received_count, reopened.HasField("resolved_time")) == (
            BAD_ITEM,
            1,
            False,
        )
        assert reopened.id > resolved.id
        assert reopened.last_received_time == reopened.received_time
