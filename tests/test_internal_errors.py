"""Nothing internal reaches a caller: a store that cannot read or commit answers UNAVAILABLE
(STORE_UNAVAILABLE) in fixed words, any other fault INTERNAL naming only the request id it was
logged with; the server serves again once the store is back. The real server, in-process, over a
real SQLite file broken from a second connection."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    IngestRequest,
    ListMessagesRequest,
    ListQuarantineRequest,
    StreamRequest,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.store import SqliteStore
from tests.conftest import FakeClock
from tests.helpers import TIMEOUT

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

# Words of the engine, or of Python, that must never reach a caller.
ENGINE_WORDS = ("sqlite", "table", "SELECT", "INSERT", "Error", "Traceback", "no such", "secret")


def gms(message_id: str) -> str:
    report = {"message_id": message_id, "status": 2, "time": 1477417294667, "number": "380961111111"}
    return json.dumps([report])


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]


def failure_of(error: grpc.aio.AioRpcError) -> Failure:
    status = rpc_status.from_call(cast("grpc.Call", error))  # an AioRpcError is one
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert status.message == error.details()
    return Failure(error.code(), error.details() or "", info.reason, dict(info.metadata))


def assert_nothing_internal(failure: Failure) -> None:
    assert not [word for word in ENGINE_WORDS if word in failure.message], failure.message


async def started(tmp_path: Path, store: SqliteStore | None = None) -> app.App:
    settings = Settings(
        listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "dlrhub.db", shutdown_grace=1.0
    )
    return await app.start(settings, store=store, clock=FakeClock())


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[app.App]:
    served = await started(tmp_path)
    try:
        yield served
    finally:
        await served.stop()


@pytest.fixture
async def stub(running: app.App) -> AsyncIterator[DeliveryReportServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield DeliveryReportServiceStub(channel)


@contextmanager
def tables_away(db: Path, *tables: str) -> Iterator[None]:
    """The tables renamed by another connection (so the server's statements find no such table), and
    given back afterwards."""
    with sqlite3.connect(db, isolation_level=None) as other:
        for table in tables:
            other.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
        try:
            yield
        finally:
            for table in tables:
                other.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
    other.close()


async def test_a_store_that_cannot_read_or_commit_answers_unavailable_then_serves_again(
    running: app.App, stub: DeliveryReportServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert (await stub.Ingest(IngestRequest(payload=gms("before-1")), timeout=TIMEOUT)).accepted_count == 1
    db = Path(running.settings.db)

    with tables_away(db, "messages", "reports", "quarantine"):
        calls: dict[str, Awaitable[object]] = {
            "GetMessage": stub.GetMessage(GetMessageRequest(message_id="before-1"), timeout=TIMEOUT),
            "ListMessages": stub.ListMessages(ListMessagesRequest(bulk_id="bulk-1"), timeout=TIMEOUT),
            "Ingest": stub.Ingest(IngestRequest(payload=gms("during-1"), request_id="r-1"), timeout=TIMEOUT),
            "ListQuarantine": stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            failure = failure_of(raised.value)
            assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"), name
            assert failure.message.startswith("the store cannot read or commit right now; retry"), name
            assert_nothing_internal(failure)

        stream = stub.Stream(StreamRequest(cursor="0"), timeout=TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stream:
                pass
        failure = failure_of(raised.value)
        assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert_nothing_internal(failure)

        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            url = f"http://127.0.0.1:{running.http_port}/webhooks/gms"
            posted = await http.post(url, content=gms("hook-1"))
        assert posted.status_code == 503
        assert posted.json()["error"]["reason"] == "STORE_UNAVAILABLE"
        assert "sqlite" not in posted.text
        assert "table" not in posted.text

    # The store is back: the same calls succeed, and the Ingest refused meanwhile is stored when retried.
    [state] = (await stub.GetMessage(GetMessageRequest(message_id="before-1"), timeout=TIMEOUT)).messages
    assert state.message_id == "before-1"
    retried = await stub.Ingest(IngestRequest(payload=gms("during-1"), request_id="r-1"), timeout=TIMEOUT)
    assert retried.accepted_count == 1
    assert (await stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT)).open_count == 0

    # Operators see what happened: the rpc lines carry the code and the engine's words; callers do not.
    running.flush_logs()
    lines = [record for record in caplog.records if record.getMessage() == "rpc"]
    unavailable = [record for record in lines if getattr(record, "code", "") == "UNAVAILABLE"]
    assert len(unavailable) == 5
    assert all("no such table" in str(getattr(record, "error", "")) for record in unavailable)


class FaultyStore(SqliteStore):
    """A real SQLite store with bugs: reading a message's state fails with a Python exception, and so
    does reading the latest cursor while `broken`."""

    broken = False

    def messages(self, message_id: str, source: int = 0) -> list[DeliveryReport]:
        raise KeyError(f"secret {message_id}")

    def latest_cursor(self) -> int:
        if self.broken:
            raise ZeroDivisionError("secret division")
        return super().latest_cursor()


@pytest.mark.parametrize("given_request_id", ["", "caller-req-7"])
async def test_an_unexpected_fault_answers_internal_naming_only_the_request_id_it_was_logged_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, given_request_id: str
) -> None:
    caplog.set_level(logging.INFO)
    store = FaultyStore(tmp_path / "dlrhub.db")
    running = await started(tmp_path, store)
    metadata = [("x-request-id", given_request_id)] if given_request_id else []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = DeliveryReportServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetMessage(GetMessageRequest(message_id="m-1"), metadata=metadata, timeout=TIMEOUT)
            unary = failure_of(raised.value)

            store.broken = True
            stream = stub.Stream(StreamRequest(cursor="0"), metadata=metadata, timeout=TIMEOUT)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stream:
                    pass
            streaming = failure_of(raised.value)
            store.broken = False

            # The server serves on.
            assert (await stub.Ingest(IngestRequest(payload=gms("m-2")), timeout=TIMEOUT)).accepted_count == 1
        running.flush_logs()
    finally:
        await running.stop()

    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 2
    for failure, error, rpc, raised_type in [
        (unary, errors[0], "GetMessage", KeyError),
        (streaming, errors[1], "Stream", ZeroDivisionError),
    ]:
        request_id = failure.metadata["request_id"]
        assert (failure.code, failure.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
        assert failure.message == f"internal error; the server logged it with request id {request_id}"
        assert_nothing_internal(failure)
        if given_request_id:
            assert request_id == given_request_id
        else:
            assert len(request_id) == 16
        # One ERROR line with the traceback and the request id; the call's rpc line carries the same id.
        assert getattr(error, "request_id", None) == request_id
        assert getattr(error, "rpc", "").endswith(f"/{rpc}")
        assert error.exc_info is not None
        assert error.exc_info[0] is raised_type
        [line] = [
            record
            for record in caplog.records
            if record.getMessage() == "rpc" and str(getattr(record, "rpc", "")).endswith(f"/{rpc}")
        ]
        assert (getattr(line, "code", None), getattr(line, "request_id", None)) == ("INTERNAL", request_id)
    assert unary.metadata["request_id"] != streaming.metadata["request_id"] or given_request_id
