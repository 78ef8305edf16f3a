"""Limits: request size, items per Ingest (gRPC and webhooks), open streams, deadlines, cancellation.

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

from deliveryreport.v1.delivery_report_service_pb2 import StreamRequest, StreamResponse
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
from tests.helpers import TIMEOUT, connect, eventually, gms, gms_batch


async def assert_not_stored(running: app.App, *message_ids: str) -> None:
    assert running.store.latest_cursor() == 0
    assert running.store.quarantined(0, 100) == []
    async with connect(running) as client:
        for message_id in message_ids:
            with pytest.raises(NotFoundError):
                await client.fetch(message_id=message_id)


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
        assert [r.message_id for r in (await client.fetch(message_id="three-3")).reports] == ["three-3"]


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


# Open streams.


async def test_streams_over_max_streams_are_refused_until_one_closes(tmp_path: Path) -> None:
    async with serving(tmp_path, max_streams=2) as running, connect(running) as client:
        one, two = open_stream(client), open_stream(client)
        try:
            assert (await first(one)).heartbeat
            assert (await first(two)).heartbeat
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
                assert (await first(again)).heartbeat
                assert running.hub.subscriber_count == 2
                # The streams still carry changes.
                await client.ingest(gms_batch("streamed-1"))
                for stream in (two, again):
                    response = await first(stream)
                    assert response.report.message_id == "streamed-1"
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
            assert response.heartbeat
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
            [state] = (await client.fetch(message_id="calm-1")).reports
            assert state.message_id == "calm-1"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
