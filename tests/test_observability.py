"""Observability: /metrics scraped around known operations, the per-call log lines, tracing.

Every metric check is a delta between two scrapes of the real HTTP endpoint
(`GET http://127.0.0.1:{admin_port}/metrics`, the admin port), parsed with prometheus_client's
own parser, so what is asserted is what Prometheus would see.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import httpx
import pytest
from google.protobuf.duration_pb2 import Duration

from deliveryreport.v1.delivery_report_service_pb2 import (
    Format,
    GetMessageRequest,
    IngestOutcome,
    IngestRequest,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app as app_module
from dlrhub.config import Settings
from dlrhub.observability.calls import CallLog
from dlrhub.observability.logs import JsonFormatter
from dlrhub.observability.metrics import UNMAPPED_CODES_LABELS
from dlrhub.store import SqliteStore
from dlrhub.store.base import Store, Transaction
from dlrhub.transport.poller import PollerSettings
from tests.conftest import ROOT, FakeClock, Running, serving
from tests.fake_provider import FakeProvider, report
from tests.helpers import TIMEOUT, Labels, Samples, eventually, scrape, value
from tools import launcher

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

    StreamCall = grpc.aio.UnaryStreamCall[StreamRequest, StreamResponse]

INGEST = "deliveryreport.v1.DeliveryReportService/Ingest"
GET_MESSAGE = "deliveryreport.v1.DeliveryReportService/GetMessage"
STREAM = "deliveryreport.v1.DeliveryReportService/Stream"
KEY = "observability-api-key"
# Distinctive payload contents that must never reach a log line.
SECRET_NUMBER = 380_977_123_456
SECRET_MESSAGE_ID = "obs-secret-mid-8472"
# A report with a reference this long travels in a StreamResponse four times over (its raw payload and
# its reference, in the report and in the state): about 240 KB, more than the client's 64 KiB HTTP/2
# window and the server's write buffer, so a consumer that reads nothing holds up the server's very
# first send. The item itself stays under the 64 KiB item limit (DLRHUB_MAX_ITEM_BYTES).
FAT_PADDING = 60_000
# No BDP probing: the client's window stays at its initial 64 KiB while it reads nothing.
STALLING_CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0)]


# --- scraping ------------------------------------------------------------------------------------


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def series(samples: Samples, name: str) -> dict[Labels, float]:
    """Every series of one sample name."""
    return {labels: sample for (sample_name, labels), sample in samples.items() if sample_name == name}


def moved(before: Samples, after: Samples, name: str) -> dict[Labels, float]:
    """The series of `name` whose value changed, by how much."""
    changes = {
        labels: after.get((name, labels), 0.0) - before.get((name, labels), 0.0)
        for labels in series(before, name).keys() | series(after, name).keys()
    }
    return {labels: change for labels, change in changes.items() if change}


def labels_of(**labels: str) -> Labels:
    return frozenset(labels.items())


# --- payloads ------------------------------------------------------------------------------------


def gms_item(message_id: str, status: int = 2, **extra: Any) -> dict[str, Any]:
    """A GMS report; the defaults (2/23/23011) map to DELIVERED."""
    item: dict[str, Any] = {
        "number": 380_961_111_111,
        "time": 1_700_000_000_000,
        "status": status,
        "substatus": 23,
        "hyber_status": 23011,
        "message_id": message_id,
        "sent_via": "sms",
    }
    item.update(extra)
    return item


def gms_request(items: object, request_id: str = "") -> IngestRequest:
    return IngestRequest(payload=json.dumps(items), format=Format.FORMAT_GMS, request_id=request_id)


# --- gRPC: reports, RPC codes, group commits, quarantine -----------------------------------------


async def test_a_batch_with_a_duplicate_and_a_bad_item_moves_each_series_by_its_items(
    server: Running,
) -> None:
    first = await server.stub.Ingest(gms_request(gms_item("obs-1")), timeout=TIMEOUT)
    assert first.accepted_count == 1
    before = await scrape(server.app.admin_port)

    batch = [gms_item("obs-1"), gms_item("obs-2"), {"status": 2, "number": 380_961_111_111}]  # no message_id
    response = await server.stub.Ingest(gms_request(batch), timeout=TIMEOUT)
    assert [result.outcome for result in response.results] == [
        IngestOutcome.INGEST_OUTCOME_DUPLICATE,
        IngestOutcome.INGEST_OUTCOME_ACCEPTED,
        IngestOutcome.INGEST_OUTCOME_REJECTED,
    ]
    await server.app.store_health.probe()  # the quarantine gauge is read ahead of scrapes: now
    after = await scrape(server.app.admin_port)

    # One item per outcome, each with its source and unified status (none for the rejected item).
    assert moved(before, after, "dlrhub_reports_total") == {
        labels_of(source="gms", status="delivered", outcome="accepted"): 1,
        labels_of(source="gms", status="delivered", outcome="duplicate"): 1,
        labels_of(source="gms", status="", outcome="rejected"): 1,
    }
    # The call: counted once, as OK, and timed.
    assert moved(before, after, "dlrhub_rpc_requests_total") == {labels_of(method=INGEST, code="OK"): 1}
    assert delta(before, after, "dlrhub_rpc_duration_seconds_count", method=INGEST) == 1
    assert delta(before, after, "dlrhub_rpc_duration_seconds_sum", method=INGEST) > 0
    assert delta(before, after, "dlrhub_rpc_duration_seconds_bucket", method=INGEST, le="+Inf") == 1
    # One group commit holding the batch's three items.
    assert delta(before, after, "dlrhub_store_commit_reports_count") == 1
    assert delta(before, after, "dlrhub_store_commit_reports_sum") == 3
    assert delta(before, after, "dlrhub_store_commit_reports_bucket", le="2.0") == 0
    assert delta(before, after, "dlrhub_store_commit_reports_bucket", le="5.0") == 1
    assert delta(before, after, "dlrhub_store_commit_seconds_count") == 1
    assert delta(before, after, "dlrhub_store_commit_seconds_sum") > 0
    # The bad item waits in the quarantine; only the new report is a change.
    assert delta(before, after, "dlrhub_quarantine_open") == 1
    assert value(after, "dlrhub_quarantine_open") == 1
    assert delta(before, after, "dlrhub_stream_latest_cursor") == 1
    assert value(after, "dlrhub_stream_latest_cursor") == int(response.results[1].cursor)
    assert moved(before, after, "dlrhub_unmapped_codes_total") == {}


async def test_failed_calls_are_counted_by_their_status_code(server: Running) -> None:
    before = await scrape(server.app.admin_port)

    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await server.stub.Ingest(IngestRequest(payload="not json", format=Format.FORMAT_GMS), timeout=TIMEOUT)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await server.stub.GetMessage(GetMessageRequest(message_id="obs-no-such-id"), timeout=TIMEOUT)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    await server.app.store_health.probe()  # the quarantine gauge is read ahead of scrapes: now
    after = await scrape(server.app.admin_port)
    assert moved(before, after, "dlrhub_rpc_requests_total") == {
        labels_of(method=INGEST, code="INVALID_ARGUMENT"): 1,
        labels_of(method=GET_MESSAGE, code="NOT_FOUND"): 1,
    }
    assert delta(before, after, "dlrhub_rpc_duration_seconds_count", method=INGEST) == 1
    assert delta(before, after, "dlrhub_rpc_duration_seconds_count", method=GET_MESSAGE) == 1
    # The unusable payload is one rejected (and quarantined) GMS item; the GetMessage wrote nothing.
    assert moved(before, after, "dlrhub_reports_total") == {
        labels_of(source="gms", status="", outcome="rejected"): 1
    }
    assert delta(before, after, "dlrhub_quarantine_open") == 1
    assert delta(before, after, "dlrhub_store_commit_reports_count") == 1
    assert delta(before, after, "dlrhub_stream_latest_cursor") == 0


async def test_a_code_missing_from_the_table_is_counted_as_unmapped_once(server: Running) -> None:
    before = await scrape(server.app.admin_port)
    unknown = {"message_id": "obs-unmapped", "status": 7, "time": 1_700_000_000_000}

    accepted = await server.stub.Ingest(gms_request(unknown), timeout=TIMEOUT)
    assert accepted.accepted_count == 1
    middle = await scrape(server.app.admin_port)
    assert moved(before, middle, "dlrhub_unmapped_codes_total") == {
        labels_of(source="gms", codes="status=7"): 1
    }
    assert moved(before, middle, "dlrhub_reports_total") == {
        labels_of(source="gms", status="unspecified", outcome="accepted"): 1
    }

    # Its duplicate is not a new unmapped report; a mapped report is not counted at all.
    duplicate = await server.stub.Ingest(gms_request([unknown, gms_item("obs-mapped")]), timeout=TIMEOUT)
    assert (duplicate.duplicate_count, duplicate.accepted_count) == (1, 1)
    after = await scrape(server.app.admin_port)
    assert moved(middle, after, "dlrhub_unmapped_codes_total") == {}
    assert moved(middle, after, "dlrhub_reports_total") == {
        labels_of(source="gms", status="unspecified", outcome="duplicate"): 1,
        labels_of(source="gms", status="delivered", outcome="accepted"): 1,
    }


async def test_unmapped_codes_keep_a_bounded_set_of_series_and_log_each_new_code_once(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 codes missing from the table made 2,000 series; now the first UNMAPPED_CODES_LABELS
    code strings have one each and the rest count under "other", and each code is logged once."""
    before = await scrape(server.app.admin_port)
    with caplog.at_level(logging.WARNING, logger="dlrhub.observability.metrics"):
        first = [gms_item(f"obs-unmapped-{n}", status=7, substatus=1000 + n) for n in range(2000)]
        assert (await server.stub.Ingest(gms_request(first), timeout=TIMEOUT)).accepted_count == 2000
        # The same codes on other messages: counted again, not logged again.
        again = [gms_item(f"obs-unmapped-again-{n}", status=7, substatus=1000 + n) for n in range(100)]
        assert (await server.stub.Ingest(gms_request(again), timeout=TIMEOUT)).accepted_count == 100
    after = await scrape(server.app.admin_port)

    unmapped = moved(before, after, "dlrhub_unmapped_codes_total")
    assert len(unmapped) == UNMAPPED_CODES_LABELS + 1
    labelled = {labels: count for labels, count in unmapped.items() if dict(labels)["codes"] != "other"}
    assert set(labelled.values()) == {2}  # the first 50 codes, each seen in both batches
    assert dict(next(iter(labelled))).keys() == {"source", "codes"}
    assert unmapped[labels_of(source="gms", codes="other")] == 2100 - 2 * UNMAPPED_CODES_LABELS

    logged = [
        record for record in caplog.records if record.getMessage().startswith("provider codes that map")
    ]
    assert sorted(vars(record)["codes"] for record in logged) == sorted(
        f"status=7,substatus={1000 + n},hyber_status=23011" for n in range(2000)
    )
    assert {vars(record)["source"] for record in logged} == {"gms"}


def documented_metrics() -> set[str]:
    """The metric names of the README's metrics table (first column, without labels)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Metrics, logs and traces") :]
    return set(re.findall(r"^\| `(dlrhub_[a-z_]+)[{`]", section, re.MULTILINE))


async def test_every_metric_the_server_exports_is_documented_in_the_readme(server: Running) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{server.app.admin_port}/metrics", timeout=TIMEOUT)
    exported = set(re.findall(r"^# TYPE (dlrhub_\w+) ", response.text, re.MULTILINE))
    # prometheus-client adds X_created (when a counter or histogram started) beside some of them.
    exported = {name for name in exported if not name.endswith("_created")}
    documented = documented_metrics()
    assert exported - documented == set(), "exported but not in the README's metrics table"
    assert documented - exported == set(), "in the README's metrics table but not exported"


# --- the poller ----------------------------------------------------------------------------------


@asynccontextmanager
async def polling_app(db: Path, clock: FakeClock, provider: FakeProvider) -> AsyncIterator[app_module.App]:
    """The whole app, polling the fake provider every 50 ms, backing off for milliseconds."""
    running = await app_module.start(
        Settings(
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            db=db,
            shutdown_grace=1.0,
        ),
        poller_settings=PollerSettings(
            provider.url, KEY, interval=0.05, backoff_initial=0.01, backoff_max=0.05
        ),
        clock=clock,
    )
    try:
        yield running
    finally:
        await running.stop()


async def test_poller_failures_are_counted_by_kind_and_fetched_reports_after_recovery(
    db_path: Path, clock: FakeClock
) -> None:
    async with FakeProvider(KEY) as provider, polling_app(db_path, clock, provider) as running:

        async def succeeded() -> bool:
            return value(await scrape(running.admin_port), "dlrhub_poller_last_success_timestamp_seconds") > 0

        await eventually(succeeded, "the poller never succeeded against an empty provider")
        before = await scrape(running.admin_port)
        mark = len(provider.requests)
        # From here on: three 500s, then a 401, then five reports.
        provider.fail_next(3, 500)
        provider.fail_next(1, 401)
        provider.add(*(report(f"obs-poll-{index}") for index in range(5)))

        async def fetched_all() -> bool:
            return delta(before, await scrape(running.admin_port), "dlrhub_poller_reports_fetched_total") >= 5

        await eventually(fetched_all, "the poller did not fetch the reports after the failures")
        after = await scrape(running.admin_port)
        answered = [request.status for request in provider.requests[mark:]]

    assert answered[:4] == [500, 500, 500, 401]
    assert moved(before, after, "dlrhub_poller_failures_total") == {
        labels_of(kind="server_error"): 3,
        labels_of(kind="auth"): 1,
    }
    assert delta(before, after, "dlrhub_poller_reports_fetched_total") == 5
    assert provider.handed_out_ids() == [f"obs-poll-{index}" for index in range(5)]
    assert moved(before, after, "dlrhub_reports_total") == {
        labels_of(source="sent_sms_report", status="delivered", outcome="accepted"): 5
    }
    last_success = value(after, "dlrhub_poller_last_success_timestamp_seconds")
    assert value(before, "dlrhub_poller_last_success_timestamp_seconds") < last_success <= time.time()


# --- a slow Stream consumer ----------------------------------------------------------------------


@asynccontextmanager
async def stalling_stub(server: Running) -> AsyncIterator[DeliveryReportServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(server.address, options=STALLING_CHANNEL_OPTIONS)
    try:
        yield DeliveryReportServiceStub(channel)
    finally:
        await channel.close(None)


async def read_message(call: StreamCall) -> StreamResponse:
    message = await asyncio.wait_for(call.read(), TIMEOUT)
    assert isinstance(message, StreamResponse), "the stream ended"
    return message


async def ingest_fat_reports(server: Running, prefix: str, count: int) -> list[int]:
    """`count` reports too big for the HTTP/2 window, one call each; their cursors."""
    cursors = []
    for index in range(count):
        response = await server.stub.Ingest(
            gms_request(gms_item(f"{prefix}-{index}", extra_id="x" * FAT_PADDING)), timeout=TIMEOUT
        )
        assert response.accepted_count == 1
        cursors.append(int(response.results[0].cursor))
    return cursors


async def test_a_slow_stream_shows_its_lag_until_it_reads_and_disappears_when_it_closes(
    server: Running,
) -> None:
    port = server.app.admin_port
    ahead = await ingest_fat_reports(server, "obs-old", 1)
    assert value(await scrape(port), "dlrhub_stream_subscribers") == 0
    async with stalling_stub(server) as stub:
        call = stub.Stream(StreamRequest(heartbeat_interval=Duration(seconds=30)), timeout=60)
        try:
            start = await read_message(call)
            assert (start.HasField("heartbeat"), int(start.cursor)) == (True, ahead[-1])
            (subscription,) = server.app.hub.subscriptions
            subscriber = str(subscription.id)
            # Live at the newest cursor: nothing to catch up.
            before = await scrape(port)
            assert value(before, "dlrhub_stream_subscribers") == 1
            assert series(before, "dlrhub_stream_lag") == {labels_of(subscriber=subscriber): 0}

            # It reads nothing while N reports arrive.
            count = 3
            cursors = await ingest_fat_reports(server, "obs-slow", count)
            during = await scrape(port)
            assert value(during, "dlrhub_stream_subscribers") == 1
            assert delta(before, during, "dlrhub_stream_latest_cursor") == count
            assert value(during, "dlrhub_stream_latest_cursor") == cursors[-1]
            assert series(during, "dlrhub_stream_lag") == {labels_of(subscriber=subscriber): count}
            # What it has not taken yet is held in the live window (the first is being sent).
            assert value(during, "dlrhub_stream_buffered_changes") >= 1
            assert value(during, "dlrhub_stream_buffered_bytes") > FAT_PADDING

            # Once it has read everything, it is behind by nothing.
            got = [await read_message(call) for _ in range(count)]
            assert [int(message.cursor) for message in got] == cursors
            assert not any(message.HasField("heartbeat") for message in got)

            async def caught_up() -> bool:
                lag = series(await scrape(port), "dlrhub_stream_lag")
                return lag == {labels_of(subscriber=subscriber): 0}

            await eventually(caught_up, "the lag did not return to 0 after the stream read everything")
            read_all = await scrape(port)  # and the window let go of it
            assert value(read_all, "dlrhub_stream_buffered_changes") == 0
            assert value(read_all, "dlrhub_stream_buffered_bytes") == 0
        finally:
            call.cancel()

        async def closed() -> bool:
            return value(await scrape(port), "dlrhub_stream_subscribers") == 0

        await eventually(closed, "the closed stream is still counted as a subscriber")
        after = await scrape(port)
        assert series(after, "dlrhub_stream_lag") == {}
        assert value(after, "dlrhub_stream_latest_cursor") == cursors[-1]


async def test_a_subscriber_that_falls_a_buffer_behind_is_counted_and_still_gets_everything(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with serving(tmp_path, clock=clock, stream_buffer=2) as running:
        address = f"127.0.0.1:{running.port}"
        channel = grpc.aio.insecure_channel(address)
        server = Running(running, DeliveryReportServiceStub(channel), channel, clock, address)
        port = running.admin_port
        try:
            async with stalling_stub(server) as stub:
                call = stub.Stream(StreamRequest(heartbeat_interval=Duration(seconds=30)), timeout=60)
                try:
                    await read_message(call)  # live
                    before = await scrape(port)
                    assert value(before, "dlrhub_stream_overflows_total") == 0
                    # Sends stall on the HTTP/2 window while more than 2 changes arrive: it overflows.
                    cursors = await ingest_fat_reports(server, "obs-overflow", 6)
                    during = await scrape(port)
                    assert delta(before, during, "dlrhub_stream_overflows_total") >= 1

                    got = [await read_message(call) for _ in range(len(cursors))]
                    assert [int(message.cursor) for message in got] == cursors  # caught up, in order
                finally:
                    call.cancel()
            overflows = value(during, "dlrhub_stream_overflows_total")

            async def closed() -> bool:
                return value(await scrape(port), "dlrhub_stream_subscribers") == 0

            await eventually(closed, "the closed stream is still counted as a subscriber")
            after = await scrape(port)  # a counter: the closed subscriber's overflows stay counted
            assert value(after, "dlrhub_stream_overflows_total") >= overflows
        finally:
            await channel.close(None)


@contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What the running loop's exception handler is given (e.g. "Task exception was never retrieved")."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


async def test_a_stream_closed_while_its_send_is_held_up_is_logged_cancelled_without_errors(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """The client goes away while the server's send waits on the HTTP/2 window, so the call's
    generator is closed by the event loop's async-generator finaliser, in another context."""
    caplog.set_level(logging.INFO, logger="dlrhub")
    port = server.app.admin_port
    with loop_errors() as errors:
        async with stalling_stub(server) as stub:
            call = stub.Stream(
                StreamRequest(heartbeat_interval=Duration(seconds=30)),
                metadata=[("x-request-id", "obs-held")],
            )
            assert (await read_message(call)).HasField("heartbeat")
            await ingest_fat_reports(server, "obs-held", 2)
            assert series(await scrape(port), "dlrhub_stream_lag") != {}
            call.cancel()

            async def closed() -> bool:
                samples = await scrape(port)
                return value(samples, "dlrhub_stream_subscribers") == 0 and not series(
                    samples, "dlrhub_stream_lag"
                )

            await eventually(closed, "the cancelled stream is still counted")

            def logged() -> bool:
                return any(getattr(record, "rpc", None) == STREAM for record in caplog.records)

            await eventually(logged, "no rpc line for the cancelled stream")
        gc.collect()
        await asyncio.sleep(0.05)
        after = await scrape(port)

    (line,) = [record for record in caplog.records if getattr(record, "rpc", None) == STREAM]
    assert line.getMessage() == "rpc"
    assert getattr(line, "code", None) == "CANCELLED"
    assert getattr(line, "request_id", None) == "obs-held"
    assert value(after, "dlrhub_rpc_requests_total", method=STREAM, code="CANCELLED") == 1
    assert errors == []
    # No error is logged, by dlrhub or by grpc (the interceptor ends the failed send as CANCELLED).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- log lines -----------------------------------------------------------------------------------


def formatted(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    """The records as the JSON lines `dlrhub serve` writes."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(record)) for record in records]


def assert_no_payload_content(records: list[logging.LogRecord]) -> None:
    text = "\n".join(JsonFormatter().format(record) for record in records)
    assert records
    assert SECRET_MESSAGE_ID not in text
    assert str(SECRET_NUMBER)[3:] not in text  # nor the number, in any spelling (380..., +380...)


async def test_an_ingest_logs_one_rpc_line_with_counts_and_no_payload_content(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    await server.stub.Ingest(gms_request(gms_item("obs-log-dup")), timeout=TIMEOUT)
    caplog.clear()
    caplog.set_level(logging.INFO)
    batch = [
        gms_item(SECRET_MESSAGE_ID, number=SECRET_NUMBER),
        gms_item("obs-log-dup"),
        {"status": 2, "number": SECRET_NUMBER, "note": SECRET_MESSAGE_ID},
    ]
    response = await server.stub.Ingest(gms_request(batch, request_id="req-1"), timeout=TIMEOUT)
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (1, 1, 1)
    server.app.flush_logs()  # as at shutdown; otherwise within CallLog.interval

    rpc_records = [
        r for r in caplog.records if r.name == "dlrhub.observability.calls" and r.getMessage() == "rpc"
    ]
    (line,) = formatted(rpc_records)
    assert line["level"] == "INFO"
    assert line["rpc"] == INGEST
    assert line["code"] == "OK"
    assert line["request_id"] == "req-1"
    assert (line["accepted"], line["duplicate"], line["rejected"]) == (1, 1, 1)
    assert isinstance(line["duration_ms"], float)
    assert 0 < line["duration_ms"] < TIMEOUT * 1000
    assert_no_payload_content(caplog.records)


async def test_a_failed_call_logs_its_code_and_the_request_id_from_metadata(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub.observability.calls")
    before = time.time()
    with pytest.raises(grpc.aio.AioRpcError):
        await server.stub.GetMessage(
            GetMessageRequest(message_id="obs-missing"), metadata=[("x-request-id", "req-2")], timeout=TIMEOUT
        )
    after = time.time()

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "rpc"]

    await eventually(lambda: bool(logged()), "no rpc line within CallLog.interval")
    (record,) = logged()
    assert before <= record.created <= after  # when the call ended, not when the line was written
    (line,) = formatted([record])
    assert (line["rpc"], line["code"], line["request_id"]) == (GET_MESSAGE, "NOT_FOUND", "req-2")
    assert line["duration_ms"] >= 0


async def test_call_lines_are_logged_in_runs_in_the_order_and_with_the_times_of_their_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub.observability.calls")
    call_log = CallLog(capacity=3, interval=60)
    times = []
    for number in range(3):
        times.append(time.time())
        call_log.add({"rpc": "X", "number": number})
        assert not caplog.records  # queued, not yet logged
        await asyncio.sleep(0.01)
    # The third filled the queue: all three are logged on the loop's next turn, outside the call.
    assert [getattr(record, "number", None) for record in caplog.records] == [0, 1, 2]
    bounds = [*times, time.time()]
    for number, record in enumerate(caplog.records):
        assert bounds[number] <= record.created <= bounds[number + 1]  # when it was added
    call_log.add({"rpc": "X", "number": 3})
    call_log.flush()
    assert [getattr(record, "number", None) for record in caplog.records] == [0, 1, 2, 3]


async def test_after_close_a_call_line_is_logged_at_once_and_a_bad_line_sinks_no_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub.observability.calls")
    call_log = CallLog(capacity=100, interval=60)

    def numbers() -> list[object]:
        return [getattr(record, "number", None) for record in caplog.records if record.getMessage() == "rpc"]

    call_log.add({"rpc": "X", "number": 0})
    call_log.add({"rpc": "X", "message": "a field LogRecord refuses"})
    call_log.add({"rpc": "X", "number": 2})
    call_log.close()  # at shutdown
    assert numbers() == [0, 2]
    assert "could not log a call's line" in caplog.text
    # A stream whose client vanished can end after the server stopped: its line is not left queued.
    call_log.add({"rpc": "X", "number": 3})
    assert numbers() == [0, 2, 3]


async def test_a_webhook_logs_one_line_with_route_counts_and_duration(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = await scrape(server.app.admin_port)
    body = [gms_item(SECRET_MESSAGE_ID, number=SECRET_NUMBER), gms_item("obs-hook-2", status=1, substatus=11)]
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"http://127.0.0.1:{server.app.http_port}/webhooks/gms",
            content=json.dumps(body),
            headers={"X-Request-Id": "hook-1", "Content-Type": "application/json"},
            timeout=TIMEOUT,
        )
    assert answer.status_code == 200
    after = await scrape(server.app.admin_port)
    server.app.flush_logs()  # as at shutdown; otherwise within CallLog.interval

    webhook_records = [
        r
        for r in caplog.records
        if r.name == "dlrhub.transport.webhooks"
        and r.getMessage() == "http"
        and r.__dict__["route"] != "/metrics"
    ]
    (line,) = formatted(webhook_records)
    assert line["route"] == "/webhooks/gms"
    assert line["status"] == 200
    assert line["request_id"] == "hook-1"
    assert (line["accepted"], line["duplicate"], line["rejected"]) == (2, 0, 0)
    assert isinstance(line["duration_ms"], float)
    assert 0 < line["duration_ms"] < TIMEOUT * 1000
    assert_no_payload_content(caplog.records)
    # The webhook takes Ingest's path: the same report series move, and no RPC is counted.
    assert moved(before, after, "dlrhub_reports_total") == {
        labels_of(source="gms", status="delivered", outcome="accepted"): 1,
        labels_of(source="gms", status="sent", outcome="accepted"): 1,
    }
    assert moved(before, after, "dlrhub_rpc_requests_total") == {}
    assert (
        moved(before, after, "dlrhub_http_requests_total")[labels_of(route="/webhooks/gms", status="200")]
        == 1
    )


async def test_every_webhook_answer_is_logged_and_counted_even_refusals(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = await scrape(server.app.admin_port)
    async with httpx.AsyncClient() as http:
        invalid = await http.post(
            f"http://127.0.0.1:{server.app.http_port}/webhooks/gms", content=b"{not json", timeout=TIMEOUT
        )
        not_utf8 = await http.post(
            f"http://127.0.0.1:{server.app.http_port}/webhooks/gms", content=b"\xff\xfe", timeout=TIMEOUT
        )
    assert (invalid.status_code, not_utf8.status_code) == (400, 400)
    after = await scrape(server.app.admin_port)
    server.app.flush_logs()
    lines = [
        r.__dict__
        for r in caplog.records
        if r.name == "dlrhub.transport.webhooks"
        and r.getMessage() == "http"
        and r.__dict__["route"] == "/webhooks/gms"
    ]
    assert [(line["status"], line.get("reason")) for line in lines] == [(400, "INVALID_JSON"), (400, None)]
    assert (
        moved(before, after, "dlrhub_http_requests_total")[labels_of(route="/webhooks/gms", status="400")]
        == 2
    )


# --- tracing, in a real `dlrhub serve` process ---------------------------------------------------

HEX32 = re.compile(r"[0-9a-f]{32}")


def serve(db: Path, **env: str) -> launcher.Server:
    """`dlrhub serve` with extra environment (and none of ours); its stdout is where the console span
    exporter writes."""
    environment = {key: val for key, val in os.environ.items() if not key.startswith(("DLRHUB_", "OTEL_"))}
    return launcher.start(db, env={**environment, **env})


def ingest_and_stop(server: launcher.Server, request_id: str) -> tuple[list[Any], str]:
    """One Ingest, then SIGTERM; the JSON log lines written after start-up, and stdout."""
    with server:
        with grpc.insecure_channel(server.address) as channel:
            response = DeliveryReportServiceStub(channel).Ingest(
                gms_request(gms_item(SECRET_MESSAGE_ID, number=SECRET_NUMBER), request_id), timeout=TIMEOUT
            )
            assert response.accepted_count == 1
        assert server.stop(timeout=20) == 0
    entries = [json.loads(line) for line in server.output.stderr if line.startswith("{")]
    return entries[entries.index(server.ready) + 1 :], "".join(server.output.stdout)


def rpc_line(lines: list[Any]) -> dict[str, Any]:
    (line,) = [entry for entry in lines if entry["message"] == "rpc"]
    assert isinstance(line, dict)
    return line


def test_console_tracing_puts_the_trace_id_on_the_rpc_line_and_exports_the_span(tmp_path: Path) -> None:
    lines, stdout = ingest_and_stop(serve(tmp_path / "traced.db", DLRHUB_TRACING="console"), "req-traced")

    line = rpc_line(lines)
    assert (line["rpc"], line["code"], line["request_id"]) == (INGEST, "OK", "req-traced")
    trace_id = line["trace_id"]
    assert HEX32.fullmatch(trace_id)
    assert trace_id != "0" * 32
    # The exported span: the call's, with that trace id.
    assert f'"trace_id": "0x{trace_id}"' in stdout
    assert "/deliveryreport.v1.DeliveryReportService/Ingest" in stdout
    assert '"service.name": "dlrhub"' in stdout  # where OTEL_SERVICE_NAME names none
    # Lines logged outside a call carry no trace id.
    assert all("trace_id" not in entry for entry in lines if entry["message"] in ("shutting down", "stopped"))
    assert SECRET_MESSAGE_ID not in json.dumps(lines)


def test_tracing_names_the_service_as_otel_service_name_says(tmp_path: Path) -> None:
    named = serve(tmp_path / "named.db", DLRHUB_TRACING="console", OTEL_SERVICE_NAME="dlrhub-eu-1")
    _, stdout = ingest_and_stop(named, "req-named")
    assert '"service.name": "dlrhub-eu-1"' in stdout
    attributes = serve(
        tmp_path / "attributes.db", DLRHUB_TRACING="console", OTEL_RESOURCE_ATTRIBUTES="service.name=dlrhub-b"
    )
    _, stdout = ingest_and_stop(attributes, "req-attributes")
    assert '"service.name": "dlrhub-b"' in stdout


def test_without_tracing_no_trace_id_and_no_span_output(tmp_path: Path) -> None:
    lines, stdout = ingest_and_stop(serve(tmp_path / "untraced.db"), "req-untraced")

    line = rpc_line(lines)
    assert (line["rpc"], line["code"], line["request_id"]) == (INGEST, "OK", "req-untraced")
    assert not any("trace_id" in entry for entry in lines)
    assert stdout == ""


def test_an_unknown_tracing_mode_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    db = tmp_path / "bogus.db"
    environment = {key: val for key, val in os.environ.items() if not key.startswith("DLRHUB_")}
    finished = subprocess.run(
        [sys.executable, "-m", "dlrhub.cli", "serve", "--listen", "127.0.0.1:0", "--db", str(db)],
        env={**environment, "DLRHUB_TRACING": "bogus", "DLRHUB_HTTP_LISTEN": "127.0.0.1:0"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert finished.returncode == 2
    # One line, and nothing else: no "serving" (tests/test_start_failures.py covers every start failure).
    [error] = finished.stderr.splitlines()
    assert error.startswith("dlrhub: cannot start: ")
    assert "DLRHUB_TRACING" in error
    assert "'bogus'" in error
    assert "console" in error
    assert "otlp" in error


async def test_an_unknown_tracing_mode_stops_an_in_process_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"DLRHUB_TRACING must be off, console or otlp, not 'bogus'"):
        await app_module.start(
            Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "x.db", tracing="bogus")
        )


async def test_an_unknown_tracing_mode_is_refused_before_the_store_is_opened(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DLRHUB_TRACING"):
        await app_module.start(
            Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "x.db", tracing="bogus")
        )
    assert not (tmp_path / "x.db").exists()  # refused before anything started


class HeldStore:
    """SQLite whose first transaction holds its commit until released, counting the reports in it."""

    def __init__(self, path: Path) -> None:
        self._store = SqliteStore(path)
        self.holding = threading.Event()
        self.release = threading.Event()
        self.held_reports = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._store.transaction() as tx:
            counting = _CountingTransaction(tx)
            yield cast(Transaction, counting)
            if not self.release.is_set():
                self.held_reports = counting.appended
                self.holding.set()
                self.release.wait()


class _CountingTransaction:
    """A transaction that counts the reports appended in it."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx
        self.appended = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def append(self, *args: Any, **kwargs: Any) -> Any:
        self.appended += 1
        return self._tx.append(*args, **kwargs)


async def test_concurrent_ingests_share_commits(tmp_path: Path, clock: FakeClock) -> None:
    """Group commit: Ingests that arrive while a commit is being written share the next one.

    The first commit is held until every other call waits for the writer, so the rest must go
    in one more commit (not one each), however slow the machine is.
    """
    store = HeldStore(tmp_path / "held.db")
    async with serving(tmp_path, clock=clock, store=cast(Store, store)) as running:
        committer = running.committer
        before = await scrape(running.admin_port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stub = DeliveryReportServiceStub(channel)
        payloads = [
            json.dumps({"message_id": f"group-{n}", "status": 2, "time": 1477417294667 + n})
            for n in range(200)
        ]
        calls = [asyncio.ensure_future(stub.Ingest(IngestRequest(payload=p))) for p in payloads]
        await eventually(lambda: store.holding.is_set() and store.held_reports + committer.waiting == 200)
        store.release.set()
        responses = await asyncio.gather(*calls)
        await channel.close(None)
        assert sum(response.accepted_count for response in responses) == 200
        after = await scrape(running.admin_port)
    commits = moved(before, after, "dlrhub_store_commit_reports_count")[labels_of()]
    assert moved(before, after, "dlrhub_store_commit_reports_sum")[labels_of()] == 200
    expected = 1 if store.held_reports == 200 else 2
    assert commits == expected, f"{commits} commits: the calls waiting for the writer were not grouped"
