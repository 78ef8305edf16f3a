"""Standard health checking: Check, Watch, and gRPC's client-side health checking, against the real
server on a free port.

A client channel with `healthCheckConfig` in its service config watches the server's health with
`grpc.health.v1.Health/Watch` and sends calls only while it answers SERVING: if Watch fails, every
call fails UNAVAILABLE, so Watch must work through every interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, IngestRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.observability.health import INTERVAL
from dlrhub.store import SqliteStore
from dlrhub.transport.handlers import SERVICE_NAME
from tests.conftest import serving
from tests.helpers import TIMEOUT
from tests.test_internal_errors import tables_away
from tools import launcher

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

    WatchCall = grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]

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
    """The code and message a GetMessage of an unknown message ends with (NOT_FOUND once it reached the
    server)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetMessage(GetMessageRequest(message_id="health-unknown"), timeout=TIMEOUT)
    return raised.value.code(), raised.value.details() or ""


async def until_code(stub: DeliveryReportServiceAsyncStub, code: grpc.StatusCode) -> str:
    """Waits (bounded) until a GetMessage ends with `code`; returns its message. The channel learns a change
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


# The store's health: NOT_SERVING while the store cannot read or commit, SERVING once it can.


async def test_a_store_that_cannot_be_read_is_not_serving_until_it_can(
    running: app.App, caplog: pytest.LogCaptureFixture
) -> None:
    address = f"127.0.0.1:{running.port}"
    async with (
        grpc.aio.insecure_channel(address) as channel,
        grpc.aio.insecure_channel(address, options=health_checked_options("")) as checked,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        call = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        try:
            assert await next_status(call) == SERVING
            with tables_away(Path(running.settings.db), "reports", "quarantine"):
                await running.store_health.probe()
                assert await next_status(call) == NOT_SERVING
                checked_stub = DeliveryReportServiceStub(checked)
                message = await until_code(checked_stub, grpc.StatusCode.UNAVAILABLE)
                assert "unhealthy" in message
            await running.store_health.probe()
            assert await next_status(call) == SERVING
            await until_code(checked_stub, grpc.StatusCode.NOT_FOUND)
        finally:
            call.cancel()
    changes = [record for record in caplog.records if record.name == "dlrhub.observability.health"]
    assert [(record.levelname, record.getMessage()) for record in changes] == [
        ("ERROR", "the store cannot serve: health NOT_SERVING until it can"),
        ("WARNING", "the store serves again: health SERVING"),
    ]
    assert "no such table" in str(getattr(changes[0], "reason", ""))


class StallingStore(SqliteStore):
    """A real SQLite store whose reads hang while `stalled` is set (a frozen filesystem, as the
    server sees one)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.stalled = threading.Event()
        self.released = threading.Event()

    def _stall(self) -> None:
        if self.stalled.is_set():
            self.released.wait(TIMEOUT)

    def messages(self, message_id: str, source: int = 0) -> list[DeliveryReport]:
        self._stall()
        return super().messages(message_id, source)

    def open_quarantine_count(self) -> int:
        self._stall()
        return super().open_quarantine_count()

    def check(self, *, write: bool = False) -> None:
        self._stall()
        super().check(write=write)


async def test_health_and_metrics_answer_at_once_while_the_store_stalls(tmp_path: Path) -> None:
    store = StallingStore(tmp_path / "dlrhub.db")
    settings = Settings(
        listen="127.0.0.1:0", http_listen="127.0.0.1:0", admin_listen="127.0.0.1:0", db=tmp_path / "dlrhub.db"
    )
    running = await app.start(settings, store=store)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
            httpx.AsyncClient(timeout=TIMEOUT) as http,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            store.stalled.set()
            fetch = asyncio.ensure_future(
                DeliveryReportServiceStub(channel).GetMessage(
                    GetMessageRequest(message_id="m-1"), timeout=TIMEOUT
                )
            )
            await asyncio.sleep(0.1)  # the GetMessage waits on the store
            for _ in range(3):
                checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                assert checked.status == SERVING
                scraped = await http.get(f"http://127.0.0.1:{running.admin_port}/metrics", timeout=0.5)
                assert scraped.status_code == 200
                assert "dlrhub_quarantine_open 0.0" in scraped.text
            assert not fetch.done()

            # A probe that gets no answer within its timeout says so.
            running.store_health.timeout = 0.2
            await running.store_health.probe()
            checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            assert checked.status == NOT_SERVING

            store.released.set()  # the filesystem thaws
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await fetch
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            store.stalled.clear()
            await running.store_health.probe()
            checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            assert checked.status == SERVING
    finally:
        store.released.set()
        await running.stop()


def acknowledged_ids(db: Path) -> set[str]:
    """The message ids stored in `db` (read after the server stopped)."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        return {message_id for (message_id,) in connection.execute("SELECT message_id FROM messages")}


def fat_gms(message_id: str) -> str:
    return json.dumps(
        [{"message_id": message_id, "status": 2, "time": 1477417294667, "extra_id": "x" * 8000}]
    )


def test_a_store_that_cannot_commit_is_not_serving_until_it_can_and_loses_nothing(db_path: Path) -> None:
    """The server's files may not grow at all (RLIMIT_FSIZE at the WAL's size: a full disk): commits
    fail, health goes NOT_SERVING and stays so while the store cannot commit (its probe writes), then
    SERVING once the limit is lifted; every Ingest acknowledged is in the file after a restart."""
    server = launcher.start(db_path)
    acknowledged: set[str] = set()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = DeliveryReportServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == SERVING
            for number in range(5):
                stub.Ingest(IngestRequest(payload=fat_gms(f"before-{number}")), timeout=TIMEOUT)
                acknowledged.add(f"before-{number}")

            wal = db_path.with_name(db_path.name + "-wal")
            full = (wal.stat().st_size, resource.RLIM_INFINITY)
            resource.prlimit(server.pid, resource.RLIMIT_FSIZE, full)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Ingest(IngestRequest(payload=fat_gms("refused-1"), request_id="r-1"), timeout=TIMEOUT)
            refused = raised.value
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert (refused.details() or "").startswith("the store cannot read or commit right now")
            assert next(watch).status == NOT_SERVING
            posted = httpx.post(f"http://{server.http_address}/webhooks/gms", content=fat_gms("refused-2"))
            assert posted.status_code == 503
            assert posted.json()["error"]["reason"] == "STORE_UNAVAILABLE"
            time.sleep(2.5 * INTERVAL)  # probes meanwhile: the store reads, but cannot commit
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == NOT_SERVING

            lifted = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            resource.prlimit(server.pid, resource.RLIMIT_FSIZE, lifted)
            assert next(watch).status == SERVING  # at the next probe
            stub.Ingest(IngestRequest(payload=fat_gms("refused-1"), request_id="r-1"), timeout=TIMEOUT)
            acknowledged.add("refused-1")  # retried, and stored now
            watch.cancel()
    finally:
        stopped = server.stop()
    assert stopped == 0
    stored = acknowledged_ids(db_path)
    assert acknowledged == stored
