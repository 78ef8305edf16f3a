"""Standard health checking: Check, Watch, and gRPC's client-side health checking, against the real
server on a free port.

A client channel with `healthCheckConfig` in its service config watches the server's health with
`grpc.health.v1.Health/Watch` and sends calls only while it answers SERVING: if Watch fails, every
call fails UNAVAILABLE, so Watch must work through every interceptor.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1.delivery_report_service_pb2 import FetchRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.transport.handlers import SERVICE_NAME
from tests.conftest import serving

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

    WatchCall = grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]

TIMEOUT = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_checked_options(service: str) -> list[tuple[str, str]]:
    """Channel options turning on gRPC's client-side health checking of `service` (it needs a load
    balancing policy that uses it: round_robin)."""
    config = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": service}}
    return [("grpc.service_config", json.dumps(config))]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[app.App]:
    async with serving(tmp_path) as started:
        yield started


async def fetch_code(stub: DeliveryReportServiceAsyncStub) -> tuple[grpc.StatusCode, str]:
    """The code and message a Fetch of an unknown message ends with (NOT_FOUND once it reached the
    server)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Fetch(FetchRequest(message_id="health-unknown"), timeout=TIMEOUT)
    return raised.value.code(), raised.value.details() or ""


async def until_code(stub: DeliveryReportServiceAsyncStub, code: grpc.StatusCode) -> str:
    """Waits (bounded) until a Fetch ends with `code`; returns its message. The channel learns a change
    of health from its Watch a moment after the server makes it."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            got, message = await fetch_code(stub)
            if got == code:
                return message
            await asyncio.sleep(0.02)


async def next_status(call: WatchCall) -> int:
    async with asyncio.timeout(TIMEOUT):
        response = await call.read()
    assert isinstance(response, health_pb2.HealthCheckResponse)
    status: int = response.status
    return status


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
async def test_a_health_checking_channel_sends_calls_while_serving_and_holds_them_while_not(
    running: app.App, service: str
) -> None:
    address = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(address, options=health_checked_options(service)) as channel:
        stub = DeliveryReportServiceStub(channel)
        code, message = await fetch_code(stub)
        assert (code, message) == (grpc.StatusCode.NOT_FOUND, "no message with message_id 'health-unknown'")

        await running.health.set(service, NOT_SERVING)
        message = await until_code(stub, grpc.StatusCode.UNAVAILABLE)
        assert "unhealthy" in message  # refused by the channel: the server never saw the call

        await running.health.set(service, SERVING)
        await until_code(stub, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
async def test_watch_streams_each_change_of_status(running: app.App, service: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        call = health.Watch(health_pb2.HealthCheckRequest(service=service))
        try:
            assert await next_status(call) == SERVING
            await running.health.set(service, NOT_SERVING)
            assert await next_status(call) == NOT_SERVING
            checked = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert checked.status == NOT_SERVING
            await running.health.set(service, SERVING)
            assert await next_status(call) == SERVING
        finally:
            call.cancel()


async def test_watch_of_an_unknown_service_says_so_and_follows_it(running: app.App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="no.Such"))
        try:
            assert await next_status(call) == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            await running.health.set("no.Such", SERVING)
            assert await next_status(call) == SERVING
        finally:
            call.cancel()


async def test_shutdown_tells_watchers_not_serving(tmp_path: Path) -> None:
    settings = Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "dlrhub.db")
    running = await app.start(settings)
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert await next_status(call) == SERVING
            stopping = asyncio.create_task(running.stop())
            try:
                assert await next_status(call) == NOT_SERVING
            finally:
                call.cancel()
    finally:
        await (stopping or running.stop())
