"""Ingest over gRPC: duplicates, out-of-order reports, rejections, request ids, concurrent commits."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import grpc
import pytest

from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    IngestRequest,
)
from deliveryreport.v1.provider_formats_pb2 import GmsReport, GmsReports
from tests.conftest import Running
from tests.helpers import (
    ACCEPTED,
    DUPLICATE,
    FULL,
    REJECTED,
    S,
    failure,
    gms,
    gms_payload,
    history_of,
    ingest,
    position,
    ssr,
    ssr_payload,
    state_of,
    status,
)

if TYPE_CHECKING:
    pass


# Each test runs over SQLite and over PostgreSQL (conftest.py).
pytestmark = pytest.mark.engines
# --- Ingest: duplicates and out-of-order reports -------------------------------------------------


async def test_the_same_report_twice_is_a_duplicate(server: Running) -> None:
    payload = gms_payload(gms("m-1", seconds=10, reference="REF"))
    first = await ingest(server.stub, payload)
    assert [result.outcome for result in first.results] == [ACCEPTED]
    assert first.results[0].cursor
    assert (first.accepted_count, first.duplicate_count, first.rejected_count) == (1, 0, 0)

    second = await ingest(server.stub, payload)
    assert [result.outcome for result in second.results] == [DUPLICATE]
    assert second.results[0].cursor == ""
    assert second.results[0].message_id == "m-1"
    assert not second.results[0].HasField("report")  # the BASIC view, unless FULL is asked for
    assert (second.accepted_count, second.duplicate_count, second.rejected_count) == (0, 1, 0)

    history = await history_of(server.stub, "m-1")
    assert [report.raw_payload for report in history] == [payload]
    assert server.app.store.latest_cursor() == position(first.results[0].cursor)


async def test_the_same_report_with_other_whitespace_and_key_order_is_a_duplicate(server: Running) -> None:
    report = ssr("m-1", "DELIVERED", seconds=5, bulk_id="B")
    compact = json.dumps({"results": [report]}, separators=(",", ":"))
    spaced = json.dumps({"results": [dict(reversed(report.items()))]}, indent=4)
    assert compact != spaced
    assert [r.outcome for r in (await ingest(server.stub, compact)).results] == [ACCEPTED]
    assert [r.outcome for r in (await ingest(server.stub, spaced)).results] == [DUPLICATE]
    history = await history_of(server.stub, "m-1")
    assert len(history) == 1
    assert history[0].raw_payload == json.dumps(report, separators=(",", ":"))  # the first text, verbatim


async def test_a_typed_report_is_the_same_report_as_its_json(server: Running) -> None:
    typed = GmsReport(
        number="380961111111",
        time=1477417294667,
        message_id="m-typed",
        status=2,
        substatus=23,
        sent_via="sms",
    )
    first = await server.stub.Ingest(IngestRequest(gms=GmsReports(reports=[typed]), view=FULL))
    assert [result.outcome for result in first.results] == [ACCEPTED]
    assert first.results[0].report.status == S.DELIVERY_STATUS_DELIVERED
    as_json = {
        "number": "380961111111",
        "time": 1477417294667,
        "message_id": "m-typed",
        "status": 2,
        "substatus": 23,
        "sent_via": "sms",
    }
    second = await ingest(server.stub, json.dumps(as_json))
    assert [result.outcome for result in second.results] == [DUPLICATE]


OUT_OF_ORDER = [
    pytest.param([("DELIVERED", 10), ("SENT", 5)], "DELIVERED", id="delivered-then-earlier-sent"),
    pytest.param([("DELIVERED", 10), ("SENT", 20)], "DELIVERED", id="delivered-then-later-sent"),
    pytest.param([("EXPIRED", 10), ("DELIVERED", 20)], "DELIVERED", id="expired-then-late-delivered"),
    pytest.param([("EXPIRED", 10), ("DELIVERED", 5)], "DELIVERED", id="expired-then-delivered-earlier"),
    pytest.param(
        [("DELIVERED", 10), ("UNDELIVERED", 20)], "DELIVERED", id="failure-never-replaces-delivered"
    ),
    pytest.param([("UNDELIVERED", 20), ("EXPIRED", 10)], "UNDELIVERED", id="later-failure-wins"),
    pytest.param([("SEEN", 10), ("DELIVERED", 20)], "SEEN", id="seen-then-later-delivered"),
    pytest.param([("DELIVERED", 20), ("SEEN", 10)], "SEEN", id="delivered-then-earlier-seen"),
    pytest.param([("SEEN", 10), ("EXPIRED", 30), ("SENT", 40)], "SEEN", id="seen-then-anything"),
]


@pytest.mark.parametrize(("reports", "expected"), OUT_OF_ORDER)
async def test_out_of_order_reports_end_in_the_same_state(
    server: Running, reports: list[tuple[str, int]], expected: str
) -> None:
    for message_id, order in (("forward", reports), ("backward", reports[::-1])):
        for name, seconds in order:
            response = await ingest(server.stub, ssr_payload(ssr(message_id, name, seconds=seconds)))
            assert [result.outcome for result in response.results] == [ACCEPTED]
        state = await state_of(server.stub, message_id)
        assert state.status == status(expected), message_id
        assert state.final
        assert len(await history_of(server.stub, message_id)) == len(reports)


# --- Ingest: rejections --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "bad_field"),
    [
        pytest.param(
            gms_payload(gms("g-0"), {"status": 2, "time": 1}, gms("g-2")), "[1].message_id", id="gms"
        ),
        pytest.param(
            ssr_payload(
                ssr("s-0"), {"messageId": "s-1", "doneAt": "2024-03-01T09:15:00.000+0000"}, ssr("s-2")
            ),
            "results[1].status",
            id="sent-sms-report",
        ),
    ],
)
async def test_one_bad_item_is_rejected_and_the_others_stored(
    server: Running, payload: str, bad_field: str
) -> None:
    response = await ingest(server.stub, payload)
    assert [result.index for result in response.results] == [0, 1, 2]
    assert [result.outcome for result in response.results] == [ACCEPTED, REJECTED, ACCEPTED]
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (2, 0, 1)
    bad = response.results[1]
    assert (bad.error.field, bad.error.reason) == (bad_field, "MISSING_FIELD")
    assert bad.error.description
    assert not bad.HasField("report")
    assert not bad.cursor
    prefix = response.results[0].message_id[0]
    for index in (0, 2):
        assert (await state_of(server.stub, f"{prefix}-{index}")).message_id == f"{prefix}-{index}"
    # The bad item is quarantined with its own text and its reason.
    [(_, quarantined)] = server.app.store.quarantined(0, 10)
    assert (quarantined.field, quarantined.reason) == (bad_field, "MISSING_FIELD")
    document = json.loads(payload)
    items = document if isinstance(document, list) else document["results"]
    assert json.loads(quarantined.raw) == items[1]
    assert quarantined.raw in payload


@pytest.mark.parametrize(
    ("payload", "reason", "fields", "field_reasons"),
    [
        pytest.param(
            '{"message_id": "m-1", "status": 2,', "INVALID_JSON", ["payload"], ["INVALID_JSON"], id="json"
        ),
        pytest.param('{"hello": "world"}', "UNKNOWN_FORMAT", ["payload"], ["UNKNOWN_FORMAT"], id="shape"),
        pytest.param(
            '{"results": {"messageId": "x"}}', "WRONG_TYPE", ["results"], ["WRONG_TYPE"], id="results"
        ),
        pytest.param(
            gms_payload({"status": 2}, {"message_id": "m-2"}, "not an object"),  # type: ignore[arg-type]
            "ALL_ITEMS_REJECTED",
            ["[0].message_id", "[1].status", "[2]"],
            ["MISSING_FIELD", "MISSING_FIELD", "WRONG_TYPE"],
            id="every-item",
        ),
        pytest.param(
            ssr_payload({"messageId": "x", "status": {"groupId": "three", "id": 5}}),
            "ALL_ITEMS_REJECTED",
            ["results[0].status.groupId"],
            ["WRONG_TYPE"],
            id="wrong-type",
        ),
    ],
)
async def test_a_wholly_invalid_request_is_invalid_argument_with_field_violations(
    server: Running, payload: str, reason: str, fields: list[str], field_reasons: list[str]
) -> None:
    details = await failure(server.stub.Ingest(IngestRequest(payload=payload)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == reason
    assert details.fields == fields
    assert details.field_reasons == field_reasons
    assert server.app.store.latest_cursor() == 0  # nothing stored
    assert server.app.store.quarantined(0, 10)  # but kept for a later look


async def test_invalid_json_says_where(server: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Ingest(IngestRequest(payload='{\n  "message_id": "m-1",\n  "status": 2,\n}'))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 4 column 1" in (raised.value.details() or "")


async def test_an_empty_request_is_missing_payload(server: Running) -> None:
    details = await failure(server.stub.Ingest(IngestRequest(request_id="r-1")))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "MISSING_PAYLOAD"
    assert details.fields == ["payload"]


# --- Ingest: idempotency and group commit --------------------------------------------------------


async def test_a_retried_request_id_gets_the_first_answer_and_nothing_twice(server: Running) -> None:
    payload = ssr_payload(ssr("m-1", "SENT", seconds=1), ssr("m-2", "DELIVERED", seconds=2))
    first = await ingest(server.stub, payload, request_id="req-1")
    assert [result.outcome for result in first.results] == [ACCEPTED, ACCEPTED]
    latest = server.app.store.latest_cursor()

    again = await ingest(server.stub, payload, request_id="req-1")
    assert again.replayed
    again.replayed = False
    assert again == first  # the same answer, cursors and all (not DUPLICATE)
    # Another body with the same id is refused (tests/test_request_ids.py): nothing is applied.
    details = await failure(
        server.stub.Ingest(IngestRequest(payload=ssr_payload(ssr("m-3")), request_id="req-1"))
    )
    assert (details.code, details.reason, details.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
        ["request_id"],
    )
    assert server.app.store.latest_cursor() == latest
    assert [len(await history_of(server.stub, message_id)) for message_id in ("m-1", "m-2")] == [1, 1]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.GetMessage(GetMessageRequest(message_id="m-3"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # Retried in the FULL view, the first answer comes with its reports.
    full = await ingest(server.stub, payload, request_id="req-1", view=FULL)
    assert [(r.outcome, r.cursor, r.message_id) for r in full.results] == [
        (r.outcome, r.cursor, r.message_id) for r in first.results
    ]
    assert [r.report.status for r in full.results] == [S.DELIVERY_STATUS_SENT, S.DELIVERY_STATUS_DELIVERED]
    assert not any(r.HasField("report") for r in first.results)
    assert server.app.store.latest_cursor() == latest

    # Without the request id the same body is a new request: its items are duplicates.
    fresh = await ingest(server.stub, payload)
    assert [result.outcome for result in fresh.results] == [DUPLICATE, DUPLICATE]


async def test_concurrent_calls_with_one_request_id_are_applied_once(server: Running) -> None:
    payload = gms_payload(gms("m-1"), gms("m-2", "SENT"), gms("m-3", "EXPIRED"))
    responses = await asyncio.gather(*(ingest(server.stub, payload, request_id="same") for _ in range(8)))
    assert [response.replayed for response in responses].count(False) == 1
    first = next(response for response in responses if not response.replayed)
    for response in responses:
        response.replayed = False
    assert all(response == first for response in responses)
    assert [result.outcome for result in responses[0].results] == [ACCEPTED] * 3
    assert server.app.store.latest_cursor() == max(position(result.cursor) for result in responses[0].results)
    assert len(server.app.store.changes(0, 100)) == 3
    for message_id in ("m-1", "m-2", "m-3"):
        assert len(await history_of(server.stub, message_id)) == 1


async def test_many_concurrent_ingests_are_all_committed(server: Running) -> None:
    count = 200
    responses = await asyncio.gather(
        *(ingest(server.stub, gms_payload(gms(f"m-{number}", seconds=number))) for number in range(count))
    )
    assert all([result.outcome for result in response.results] == [ACCEPTED] for response in responses)
    cursors = [position(response.results[0].cursor) for response in responses]
    assert len(set(cursors)) == count
    assert server.app.store.latest_cursor() == max(cursors)
    states = await asyncio.gather(*(state_of(server.stub, f"m-{number}") for number in range(count)))
    assert [state.message_id for state in states] == [f"m-{number}" for number in range(count)]
    assert all(state.status == S.DELIVERY_STATUS_DELIVERED for state in states)
    # Each answer's cursor is the stored position of that message's report.
    stored = {change.report.message_id: change.cursor for change in server.app.store.changes(0, 1000)}
    assert stored == {f"m-{number}": cursor for number, cursor in enumerate(cursors)}
