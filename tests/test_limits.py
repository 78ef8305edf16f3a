"""Limits: request size, items per Ingest (gRPC and webhooks), answers that fit a default client, item
size, open streams, deadlines, cancellation.

Against the real server in-process (grpc.aio) and the real client; each test starts its own server
with the limit it checks set small.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import cast

import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1.delivery_report_service_pb2 import IngestRequest, StreamRequest, StreamResponse
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from deliveryreport.v1.provider_formats_pb2 import GmsReport
from dlrhub import app
from dlrhub_client import (
    AsyncClient,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tests.conftest import serving
from tests.helpers import (
    ACCEPTED,
    FULL,
    REJECTED,
    TIMEOUT,
    connect,
    details_of,
    eventually,
    gms,
    gms_batch,
    ssr,
    ssr_payload,
)


async def assert_not_stored(running: app.App, *message_ids: str) -> None:
    assert running.store.latest_cursor() == 0
    assert running.store.quarantined(0, 100) == []
    async with connect(running) as client:
        for message_id in message_ids:
            with pytest.raises(NotFoundError):
                await client.get_message(message_id)


def open_stream(client: AsyncClient) -> AsyncGenerator[StreamResponse, None]:
    return cast(AsyncGenerator[StreamResponse, None], client.stream(include_heartbeats=True))


async def first(stream: AsyncGenerator[StreamResponse, None]) -> StreamResponse:
    async with asyncio.timeout(TIMEOUT):
        return await anext(stream)


# Request size.


async def test_a_request_over_max_request_bytes_is_resource_exhausted(tmp_path: Path) -> None:
    async with serving(tmp_path, max_request_bytes=2048) as running, connect(running) as client:
        big = json.dumps([gms("big-1", reference="x" * 2100)])
        with pytest.raises(ResourceExhaustedError) as raised:
            await client.ingest(big)
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2048" in raised.value.message
        await assert_not_stored(running, "big-1")

        small = gms_batch("small-1", "small-2", "small-3")
        assert len(small) < 2048
        assert (await client.ingest(small)).accepted_count == 3


async def test_a_webhook_body_over_http_max_body_bytes_is_413(tmp_path: Path) -> None:
    async with serving(tmp_path, http_max_body_bytes=1024) as running:
        url = f"http://127.0.0.1:{running.http_port}/webhooks/gms"
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            response = await http.post(url, content=json.dumps([gms("huge-1", reference="x" * 1100)]))
            assert response.status_code == 413
            assert response.json()["error"]["reason"] == "BODY_TOO_LARGE"
            await assert_not_stored(running, "huge-1")
            assert (await http.post(url, content=gms_batch("fits-1"))).status_code == 200


# Items per Ingest.


async def test_a_batch_over_max_batch_items_is_refused_whole(tmp_path: Path) -> None:
    async with serving(tmp_path, max_batch_items=3) as running, connect(running) as client:
        four = ["four-1", "four-2", "four-3", "four-4"]
        with pytest.raises(InvalidArgumentError) as raised:
            await client.ingest(gms_batch(*four))
        error = raised.value
        assert error.reason == "TOO_MANY_ITEMS"
        assert error.metadata == {"items": "4", "max_items": "3"}
        assert "3" in error.message
        assert [(v.field, v.reason) for v in error.violations] == [("payload", "TOO_MANY_ITEMS")]
        await assert_not_stored(running, *four)

        with pytest.raises(InvalidArgumentError) as typed:
            await client.ingest_gms([json_format.ParseDict(gms(m), GmsReport()) for m in four])
        assert typed.value.reason == "TOO_MANY_ITEMS"
        assert [v.field for v in typed.value.violations] == ["gms"]
        await assert_not_stored(running, *four)

        response = await client.ingest(gms_batch("three-1", "three-2", "three-3"))
        assert response.accepted_count == 3
        assert [r.message_id for r in (await client.get_message("three-3")).messages] == ["three-3"]


async def test_a_webhook_batch_over_max_batch_items_is_413(tmp_path: Path) -> None:
    async with serving(tmp_path, max_batch_items=3) as running:
        url = f"http://127.0.0.1:{running.http_port}/webhooks/gms"
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            response = await http.post(url, content=gms_batch("hook-1", "hook-2", "hook-3", "hook-4"))
            assert response.status_code == 413
            error = response.json()["error"]
            assert error["reason"] == "TOO_MANY_ITEMS"
            assert "at most 3" in error["description"]
            await assert_not_stored(running, "hook-1", "hook-4")

            response = await http.post(url, content=gms_batch("hook-1", "hook-2", "hook-3"))
            assert response.status_code == 200
            assert response.json()["accepted"] == 3
        assert running.store.latest_cursor() == 3


# Answers that fit a default client (gRPC clients accept 4 MiB by default).

DEFAULT_RECEIVE_LIMIT = 4 * 1024 * 1024


def wordy_batch(count: int, prefix: str) -> str:
    """`count` SentSMSReport reports whose normalised reports are about 450 bytes each."""
    return ssr_payload(
        *(ssr(f"{prefix}-{n:05}", bulk_id="WORDY", reference=f"{n:05}-" + "r" * 300) for n in range(count))
    )


async def test_a_10000_item_ingest_answers_a_default_client(tmp_path: Path) -> None:
    async with (
        serving(tmp_path) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,  # gRPC's default options
    ):
        stub = DeliveryReportServiceStub(channel)
        payload = wordy_batch(10_000, "big")

        # Every report echoed back would be over 4 MiB: FULL is refused before anything is stored.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Ingest(IngestRequest(payload=payload, view=FULL), timeout=60)
        details = details_of(raised.value)
        assert (raised.value.code(), details.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "RESPONSE_TOO_LARGE",
        )
        assert (details.fields, details.field_reasons) == (["view"], ["RESPONSE_TOO_LARGE"])
        assert int(details.metadata["response_bytes"]) > int(details.metadata["max_response_bytes"])
        assert int(details.metadata["max_response_bytes"]) < DEFAULT_RECEIVE_LIMIT
        assert details.metadata["max_response_bytes"] in (raised.value.details() or "")
        assert running.store.latest_cursor() == 0
        assert running.store.quarantined(0, 10) == []

        # The BASIC view (the default) answers every item.
        answer = await stub.Ingest(IngestRequest(payload=payload, request_id="big"), timeout=60)
        assert answer.accepted_count == 10_000
        assert [r.message_id for r in answer.results] == [f"big-{n:05}" for n in range(10_000)]
        assert all(r.cursor and not r.HasField("report") for r in answer.results)
        assert answer.ByteSize() < DEFAULT_RECEIVE_LIMIT // 4
        assert running.store.latest_cursor() == 10_000
        # Retried, it answers the same again, in the view asked for.
        again = await stub.Ingest(IngestRequest(payload=payload, request_id="big"), timeout=60)
        assert again.replayed
        again.replayed = False
        assert again == answer

        # A FULL answer that fits is given whole.
        few = await stub.Ingest(IngestRequest(payload=wordy_batch(100, "few"), view=FULL), timeout=60)
        assert [r.report.reference[:6] for r in few.results] == [f"{n:05}-" for n in range(100)]


async def test_a_large_batch_of_rejected_items_answers_a_default_client(tmp_path: Path) -> None:
    async with (
        serving(tmp_path) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = DeliveryReportServiceStub(channel)
        item: dict[str, object] = {"to": "41793026727", "doneAt": "2019-11-09T16:00:00.000+0000"}
        nameless = ssr_payload(*[item] * 10_000)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Ingest(IngestRequest(payload=nameless), timeout=60)
        # Before, its 10,000 field violations were over the client's metadata limit: RESOURCE_EXHAUSTED.
        details = details_of(raised.value)
        assert (raised.value.code(), details.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "ALL_ITEMS_REJECTED",
        )
        shown = len(details.fields)
        assert 10 <= shown < 100
        assert details.fields == [f"results[{n}].messageId" for n in range(shown)]
        assert set(details.field_reasons) == {"MISSING_FIELD"}
        assert int(details.metadata["violations_omitted"]) == 10_000 - shown
        assert "10000" in (raised.value.details() or "")
        assert len(running.store.quarantined(0, 20_000)) == 10_000  # every item kept


# Item size.


async def test_an_item_over_max_item_bytes_is_rejected_and_quarantined(tmp_path: Path) -> None:
    async with serving(tmp_path, max_item_bytes=1024) as running, connect(running) as client:
        big = {**ssr("big-item"), "callbackData": "x" * 1000}
        payload = ssr_payload(ssr("small-1"), big, ssr("small-2"))
        answer = await client.ingest(payload)
        assert [(r.outcome, r.message_id) for r in answer.results] == [
            (ACCEPTED, "small-1"),
            (REJECTED, ""),
            (ACCEPTED, "small-2"),
        ]
        error = answer.results[1].error
        assert (error.field, error.reason) == ("results[1]", "ITEM_TOO_LARGE")
        assert "1024" in error.description
        [(_, quarantined)] = running.store.quarantined(0, 10)
        assert (quarantined.field, quarantined.reason) == ("results[1]", "ITEM_TOO_LARGE")
        assert json.loads(quarantined.raw) == big
        with pytest.raises(NotFoundError):
            await client.get_message("big-item")

        # Alone, it is a request with nothing valid; through a webhook, a 400 naming the item.
        with pytest.raises(InvalidArgumentError) as raised:
            await client.ingest(ssr_payload(big))
        assert raised.value.reason == "ALL_ITEMS_REJECTED"
        assert [(v.field, v.reason) for v in raised.value.violations] == [("results[0]", "ITEM_TOO_LARGE")]
        url = f"http://127.0.0.1:{running.http_port}/webhooks/sent-sms-report"
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            response = await http.post(url, content=payload)
        assert response.status_code == 400
        assert [r["outcome"] for r in response.json()["results"]] == ["DUPLICATE", "REJECTED", "DUPLICATE"]
        assert response.json()["results"][1]["error"]["reason"] == "ITEM_TOO_LARGE"


# Open streams.


async def test_streams_over_max_streams_are_refused_until_one_closes(tmp_path: Path) -> None:
    async with serving(tmp_path, max_streams=2) as running, connect(running) as client:
        one, two = open_stream(client), open_stream(client)
        try:
            assert (await first(one)).HasField("heartbeat")
            assert (await first(two)).HasField("heartbeat")
            assert running.hub.subscriber_count == 2

            third = open_stream(client)
            with pytest.raises(ResourceExhaustedError) as raised:
                await first(third)
            assert raised.value.reason == "TOO_MANY_STREAMS"
            assert raised.value.metadata == {"max_streams": "2"}
            assert "2" in raised.value.message
            assert running.hub.subscriber_count == 2

            await one.aclose()
            await eventually(
                lambda: running.hub.subscriber_count == 1, "the closed stream's subscription ends"
            )
            again = open_stream(client)
            try:
                assert (await first(again)).HasField("heartbeat")
                assert running.hub.subscriber_count == 2
                # The streams still carry changes.
                await client.ingest(gms_batch("streamed-1"))
                for stream in (two, again):
                    response = await first(stream)
                    assert response.change.report.message_id == "streamed-1"
            finally:
                await again.aclose()
        finally:
            await one.aclose()
            await two.aclose()
        await eventually(lambda: running.hub.subscriber_count == 0, "every subscription ends")


async def test_max_streams_holds_for_concurrent_calls_resuming_from_a_cursor(tmp_path: Path) -> None:
    """Resuming from a cursor reads the store before subscribing; concurrent calls must not all pass.

    The server's read threads are held busy while the calls arrive, so every call waits on its read
    at the same time: the way a burst of reconnecting consumers meets a busy store.
    """
    async with serving(tmp_path, max_streams=2) as running, connect(running) as client:
        await client.ingest(gms_batch("resume-1"))
        gate = threading.Event()
        busy = [running.reads.submit(gate.wait, TIMEOUT) for _ in range(16)]
        streams = [cast(AsyncGenerator[StreamResponse, None], client.stream(cursor="0")) for _ in range(12)]
        try:
            pending = asyncio.gather(*(first(stream) for stream in streams), return_exceptions=True)
            # Every call has arrived and waits for a read thread: queued behind the blockers the
            # threads do not hold.
            reads = running.reads
            waiting = len(busy) - reads._max_workers + len(streams)
            await eventually(lambda: reads._work_queue.qsize() == waiting, "every call waits for a read")
            gate.set()
            results = await pending
            opened = [result for result in results if isinstance(result, StreamResponse)]
            refused = [result for result in results if isinstance(result, ResourceExhaustedError)]
            assert len(opened) == 2, f"{len(opened)} streams opened with max_streams=2"
            assert len(refused) == 10, results
            assert {error.reason for error in refused} == {"TOO_MANY_STREAMS"}
            assert running.hub.subscriber_count == 2
        finally:
            gate.set()
            for stream in streams:
                await stream.aclose()
        assert all(future.result() for future in busy)
        await eventually(lambda: running.hub.subscriber_count == 0, "every subscription ends")


async def test_a_cancelled_stream_call_ends_its_subscription(tmp_path: Path) -> None:
    async with (
        serving(tmp_path) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = DeliveryReportServiceStub(channel)
        calls = [stub.Stream(StreamRequest(from_beginning=True)) for _ in range(3)]
        for call in calls:
            async with asyncio.timeout(TIMEOUT):
                response = await call.read()
            assert isinstance(response, StreamResponse)
            assert response.HasField("heartbeat")
        assert running.hub.subscriber_count == 3

        calls[0].cancel()
        await eventually(lambda: running.hub.subscriber_count == 2, "the cancelled call's subscription ends")
        for call in calls[1:]:
            call.cancel()
        await eventually(lambda: running.hub.subscriber_count == 0, "every subscription ends")


async def test_a_cancelled_client_task_ends_its_stream_subscription(tmp_path: Path) -> None:
    async with serving(tmp_path) as running, connect(running) as client:
        received: list[StreamResponse] = []

        async def consume() -> None:
            async for response in client.stream(include_heartbeats=True):
                received.append(response)

        task = asyncio.create_task(consume())
        try:
            await eventually(
                lambda: running.hub.subscriber_count == 1 and bool(received), "the stream is open"
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await eventually(lambda: running.hub.subscriber_count == 0, "the subscription ends with the task")


# Deadlines.


async def test_an_expired_deadline_fails_and_the_server_stays_healthy(tmp_path: Path) -> None:
    async with serving(tmp_path) as running:
        # Another connection holds the write lock, so the commit cannot finish before the deadline.
        blocker = sqlite3.connect(tmp_path / "dlrhub.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            async with connect(running, timeout=0.3) as hurried:
                with pytest.raises(DeadlineExceededError) as raised:
                    await hurried.ingest(gms_batch("hurried-1"))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

        async with connect(running) as client:
            assert (await client.ingest(gms_batch("calm-1"))).accepted_count == 1
            [state] = (await client.get_message("calm-1")).messages
            assert state.message_id == "calm-1"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
