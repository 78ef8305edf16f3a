"""The per-call interceptor takes every handler shape, and a client that leaves mid-stream is a
normal event: logged and counted as CANCELLED, with no ERROR line (the real server, in-process)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from deliveryreport.v1.delivery_report_service_pb2 import IngestRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from tests.conftest import serving
from tests.helpers import TIMEOUT, eventually

SERVICE = "deliveryreport.v1.DeliveryReportService"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

# A consumer in its own process: opens the stream, reads two messages, then reads nothing more (so
# the server's sends back up on the HTTP/2 window) until it is killed.
CONSUMER = """
import sys
import grpc
from deliveryreport.v1.delivery_report_service_pb2 import StreamBatchesRequest, StreamRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub

stub = DeliveryReportServiceStub(grpc.insecure_channel(sys.argv[1]))
request = StreamRequest(from_beginning=True)
if sys.argv[2] == "Stream":
    responses = stub.Stream(request)
else:
    responses = stub.StreamBatches(StreamBatchesRequest(stream=request))
next(responses)
next(responses)
print("reading no more", flush=True)
sys.stdin.read()
"""


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[app.App]:
    async with serving(tmp_path) as started:
        yield started


async def store_fat_reports(running: app.App, count: int) -> None:
    """`count` GMS reports of ~20 KB each: far more than the HTTP/2 window of a consumer that stops."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = DeliveryReportServiceStub(channel)
        for start in range(0, count, 50):
            reports = [
                {"message_id": f"fat-{number}", "status": 2, "time": 1477417294667, "extra_id": "x" * 20_000}
                for number in range(start, min(start + 50, count))
            ]
            response = await stub.Ingest(IngestRequest(payload=json.dumps(reports)), timeout=TIMEOUT)
            assert response.accepted_count == len(reports)


@pytest.mark.parametrize("rpc", ["Stream", "StreamBatches"])
async def test_a_consumer_killed_mid_stream_is_logged_cancelled_and_counted_without_an_error(
    running: app.App, rpc: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await store_fat_reports(running, 300)
    consumer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CONSUMER,
        f"127.0.0.1:{running.port}",
        rpc,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert consumer.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            assert await consumer.stdout.readline() == b"reading no more\n"
        await eventually(lambda: running.hub.subscriber_count == 1, "the stream is open")
        await asyncio.sleep(0.2)  # the server's sends back up meanwhile
    finally:
        consumer.send_signal(signal.SIGKILL)
        await consumer.wait()
    await eventually(lambda: running.hub.subscriber_count == 0, "the stream ends")
    running.flush_logs()

    method = f"{SERVICE}/{rpc}"
    (line,) = [record for record in caplog.records if getattr(record, "rpc", None) == method]
    assert getattr(line, "code", None) == "CANCELLED"
    assert getattr(line, "messages", 0) >= 2
    counted = running.metrics.registry.get_sample_value(
        "dlrhub_rpc_requests_total", {"method": method, "code": "CANCELLED"}
    )
    assert counted == 1
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [f"{record.name}: {record.getMessage()}" for record in errors] == []


async def test_a_streaming_request_is_served_and_an_undecodable_one_refused(running: app.App) -> None:
    """Server reflection is a stream-stream call: the interceptor wraps it as it does the others."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        reflect = channel.stream_stream(
            REFLECTION,
            request_serializer=lambda request: request,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listed = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        call = reflect(iter([listed]), timeout=TIMEOUT)
        services = [response async for response in call]
        assert SERVICE in {service.name for service in services[0].list_services_response.service}

        call = reflect(iter([listed, b"\xff\xff\xff"]), timeout=TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("the request is not a valid protobuf message")
    status = rpc_status.from_call(cast("grpc.Call", error))  # an AioRpcError is one
    info = error_details_pb2.ErrorInfo()
    assert status is not None
    assert status.details[0].Unpack(info)
    assert info.reason == "UNDECODABLE_REQUEST"
