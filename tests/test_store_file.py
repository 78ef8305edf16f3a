"""The database file under a running server: deleted (with its directory) or replaced, the server
stops acknowledging and goes NOT_SERVING; nothing acknowledged is missing after a restart. The real
server, in-process, over a real SQLite file."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, IngestRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from tests.conftest import FakeClock
from tests.helpers import TIMEOUT

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def gms(message_id: str) -> str:
    return json.dumps([{"message_id": message_id, "status": 2, "time": 1477417294667}])


def delete_the_directory(db: Path) -> None:
    shutil.rmtree(db.parent)


def replace_the_file(db: Path) -> None:
    """Moved aside and copied back: the same bytes, another file."""
    aside = db.with_name("aside.db")
    db.rename(aside)
    shutil.copyfile(aside, db)


async def start(db: Path) -> app.App:
    settings = Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=db, shutdown_grace=1.0)
    return await app.start(settings, clock=FakeClock())


@pytest.mark.parametrize(
    ("change", "said"),
    [(delete_the_directory, "was deleted under the running server"), (replace_the_file, "was replaced")],
)
async def test_a_database_file_deleted_or_replaced_is_never_acknowledged_into(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: Callable[[Path], None], said: str
) -> None:
    caplog.set_level(logging.INFO)
    db = tmp_path / "data" / "dlrhub.db"
    running = await start(db)
    answers: list[str] = []  # of each Ingest after the change: its code, and the start of its message
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = DeliveryReportServiceStub(channel)
            before = await stub.Ingest(IngestRequest(payload=gms("before")), timeout=TIMEOUT)
            assert before.accepted_count == 1

            change(db)
            for number in range(50):
                try:
                    await stub.Ingest(IngestRequest(payload=gms(f"after-{number}")), timeout=TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    answers.append(f"{error.code().name}: {(error.details() or '')[:41]}")
                else:
                    answers.append("OK")
            health = health_pb2_grpc.HealthStub(channel)
            checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert checked.status == NOT_SERVING
            await running.store_health.probe()  # the file does not come back: it stays so
            checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert checked.status == NOT_SERVING
    finally:
        await running.stop()
    assert answers == ["UNAVAILABLE: the store cannot read or commit right now"] * 50
    [changed] = [record for record in caplog.records if record.name == "dlrhub.observability.health"]
    assert changed.levelname == "ERROR"
    assert said in str(getattr(changed, "reason", ""))
    assert str(db) in str(getattr(changed, "reason", ""))

    # After a restart, on whatever the path names now, the server serves and stores.
    running = await start(db)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = DeliveryReportServiceStub(channel)
            assert (
                await stub.Ingest(IngestRequest(payload=gms("restarted")), timeout=TIMEOUT)
            ).accepted_count == 1
            [state] = (
                await stub.GetMessage(GetMessageRequest(message_id="restarted"), timeout=TIMEOUT)
            ).messages
            assert state.message_id == "restarted"
    finally:
        await running.stop()
