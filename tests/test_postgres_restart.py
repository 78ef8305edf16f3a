"""The database restarted under load: two `dlrhub serve` processes on a PostgreSQL cluster of the
test's own, stopped (as a crash would) and started again while callers write and a subscriber follows."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1.delivery_report_service_pb2 import IngestRequest, StreamRequest, StreamResponse
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from tests.helpers import ACCEPTED, TIMEOUT, details_of, eventually, gms, payload_of, read_message
from tests.postgres import position
from tools import launcher, pg_cluster

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub as Stub

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def cluster() -> Iterator[pg_cluster.Cluster]:
    """A cluster this test alone uses: it stops and starts its server."""
    running = pg_cluster.start()
    try:
        yield running
    finally:
        pg_cluster.stop(running)


@contextlib.asynccontextmanager
async def replica(url: str) -> AsyncIterator[tuple[launcher.Server, Stub, health_pb2_grpc.HealthStub]]:
    """A `dlrhub serve` process over the database at `url`, and stubs on it."""
    with await asyncio.to_thread(launcher.start, url) as running:
        channel = grpc.aio.insecure_channel(running.address)
        try:
            yield running, DeliveryReportServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        finally:
            await channel.close(None)


async def health(stub: health_pb2_grpc.HealthStub) -> int:
    answer = await asyncio.wait_for(stub.Check(health_pb2.HealthCheckRequest()), TIMEOUT)
    return int(answer.status)


async def test_a_database_restart_under_load_loses_nothing_acknowledged(cluster: pg_cluster.Cluster) -> None:
    async with (
        replica(cluster.url) as (_, stub_a, health_a),
        replica(cluster.url) as (_, stub_b, health_b),
    ):
        subscriber = stub_b.Stream(StreamRequest())
        assert (await read_message(subscriber)).HasField("heartbeat")
        acknowledged: list[str] = []
        refused: list[str] = []
        writing = True

        async def writer(stub: Stub, name: str) -> None:
            for n in itertools.count():
                if not writing:
                    return
                request = IngestRequest(payload=payload_of(gms(f"restart-{name}-{n}")))
                try:
                    response = await asyncio.wait_for(stub.Ingest(request), TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    refused.append(f"{error.code().name} {details_of(error).reason}")
                    await asyncio.sleep(0.05)
                    continue
                [result] = response.results
                assert result.outcome == ACCEPTED
                acknowledged.append(result.cursor)

        writers = [asyncio.create_task(writer(stub, name)) for stub, name in ((stub_a, "a"), (stub_b, "b"))]
        try:
            await eventually(lambda: len(acknowledged) >= 20, "writes before the restart")
            await asyncio.to_thread(pg_cluster.stop_server, cluster)
            before = len(acknowledged)
            await eventually(lambda: len(refused) >= 4, "calls refused while the database is down")
            for stub in (health_a, health_b):
                await eventually(lambda stub=stub: _is(stub, NOT_SERVING), "NOT_SERVING while it is down")
            assert len(acknowledged) <= before + 2  # only calls committed just before the stop
            await asyncio.to_thread(pg_cluster.start_server, cluster)
            for stub in (health_a, health_b):
                await eventually(lambda stub=stub: _is(stub, SERVING), "SERVING once it is back", within=20)
            resumed = len(acknowledged)
            await eventually(lambda: len(acknowledged) >= resumed + 20, "writes after the restart", within=20)
        finally:
            writing = False
            await asyncio.gather(*writers)
        # Refused, never acknowledged, while it was down; and no other answer.
        assert set(refused) == {"UNAVAILABLE STORE_UNAVAILABLE"}
        # The subscriber's stream stayed open and carried on: everything acknowledged, once, in order.
        delivered: list[str] = []
        async with asyncio.timeout(TIMEOUT * 2):
            while not set(acknowledged) <= set(delivered):
                message = await subscriber.read()
                assert isinstance(message, StreamResponse)
                if message.HasField("change"):
                    delivered.append(message.cursor)
        subscriber.cancel()
        assert delivered == sorted(set(delivered), key=position)


async def _is(stub: health_pb2_grpc.HealthStub, status: int) -> bool:
    return await health(stub) == status
