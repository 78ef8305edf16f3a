"""What the tests share: payload builders, bounded waits, clients, error-detail decoding, stream readers.

Fixtures (the server, the clock, the `dlrhub serve` process) are in conftest.py; starting `dlrhub serve`
as a process is tools/launcher.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    GetMessageResponse,
    IngestOutcome,
    IngestRequest,
    IngestResponse,
    IngestResponseView,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub import app as dlrhub_app
from dlrhub.config import Settings
from dlrhub.store import PostgresStore, SqliteStore
from dlrhub_client import AsyncClient, TlsConfig
from tests.conftest import FakeClock

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub as Stub

    StreamCall = grpc.aio.UnaryStreamCall[StreamRequest, StreamResponse]

TIMEOUT = 10.0  # seconds: the bound on every call, stream read and wait for a condition
PROCESS_TIMEOUT = 30.0  # seconds: the bound on a subprocess (grpcurl, the CLI) and a server restart

S = DeliveryStatus
ACCEPTED = IngestOutcome.INGEST_OUTCOME_ACCEPTED
DUPLICATE = IngestOutcome.INGEST_OUTCOME_DUPLICATE
REJECTED = IngestOutcome.INGEST_OUTCOME_REJECTED
GMS = Source.SOURCE_GMS
SSR = Source.SOURCE_SENT_SMS_REPORT
FULL = IngestResponseView.INGEST_RESPONSE_VIEW_FULL

EPOCH = datetime(2024, 3, 1, tzinfo=UTC)


# --- payloads ------------------------------------------------------------------------------------

SSR_STATUS: dict[str, tuple[int, int]] = {
    "ACCEPTED": (1, 26),
    "SENT": (3, 2),
    "DELIVERED": (3, 5),
    "UNDELIVERED": (2, 9),
    "EXPIRED": (4, 29),
    "REJECTED": (5, 6),
}
GMS_STATUS: dict[str, tuple[int, int, int | None]] = {
    "SENT": (1, 11, None),
    "DELIVERED": (2, 23, 23011),
    "UNDELIVERED": (3, 35, None),
    "EXPIRED": (3, 35, 35015),
}


def status(name: str) -> DeliveryStatus.ValueType:
    return S.Value(f"DELIVERY_STATUS_{name}")


def ssr(
    message_id: str,
    name: str = "DELIVERED",
    *,
    seconds: int = 0,
    bulk_id: str | None = None,
    reference: str | None = None,
    channel: str | None = None,
) -> dict[str, object]:
    """One SentSMSReport report; name "SEEN" gives a seen report (seenAt, no status)."""
    moment = (EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
    report: dict[str, object] = {"messageId": message_id, "to": "41793026727", "from": "InfoSMS"}
    if name == "SEEN":
        report["seenAt"] = moment
    else:
        group_id, status_id = SSR_STATUS[name]
        report["status"] = {"groupId": group_id, "id": status_id, "name": f"{name}_X"}
        report["doneAt"] = moment
    if bulk_id is not None:
        report["bulkId"] = bulk_id
    if reference is not None:
        report["callbackData"] = reference
    if channel is not None:
        report["channel"] = channel
    return report


def gms(
    message_id: str,
    name: str = "DELIVERED",
    *,
    seconds: int = 0,
    reference: str | None = None,
    sent_via: str = "sms",
) -> dict[str, object]:
    """One GMS report."""
    gms_status, substatus, hyber_status = GMS_STATUS[name]
    report: dict[str, object] = {
        "number": "380961111111",
        "time": int((EPOCH + timedelta(seconds=seconds)).timestamp() * 1000),
        "status": gms_status,
        "substatus": substatus,
        "message_id": message_id,
        "sent_via": sent_via,
    }
    if hyber_status is not None:
        report["hyber_status"] = hyber_status
    if reference is not None:
        report["extra_id"] = reference
    return report


def gms_batch(*message_ids: str) -> str:
    """A GMS push body (a batch array): one delivered SMS report per message id, referenced "ref-<id>"."""
    return json.dumps([gms(message_id, reference=f"ref-{message_id}") for message_id in message_ids])


def gms_bare(
    message_id: str, *, status: int = 2, time_ms: int = 1_477_417_294_667, **fields: Any
) -> dict[str, Any]:
    """A GMS report with only the fields given (the least a report needs, and `fields`), as the
    provider spells them."""
    return {"message_id": message_id, "status": status, "time": time_ms, **fields}


def ssr_payload(*reports: dict[str, object]) -> str:
    return json.dumps({"results": list(reports)})


def gms_payload(*reports: dict[str, object]) -> str:
    return json.dumps(reports[0] if len(reports) == 1 else list(reports))


def payload_of(report: dict[str, object]) -> str:
    return ssr_payload(report) if "messageId" in report else gms_payload(report)


async def ingest(
    stub: Stub,
    payload: str,
    request_id: str = "",
    view: IngestResponseView.ValueType = IngestResponseView.INGEST_RESPONSE_VIEW_UNSPECIFIED,
) -> IngestResponse:
    response: IngestResponse = await asyncio.wait_for(
        stub.Ingest(IngestRequest(payload=payload, request_id=request_id, view=view)), TIMEOUT
    )
    return response


async def ingest_each(stub: Stub, *reports: dict[str, object]) -> list[int]:
    """Ingests the reports one call at a time, in order; returns their cursors."""
    cursors = []
    for report in reports:
        response = await ingest(stub, payload_of(report))
        assert [result.outcome for result in response.results] == [ACCEPTED]
        cursors.append(position(response.results[0].cursor))
    return cursors


async def get_message(stub: Stub, request: GetMessageRequest) -> GetMessageResponse:
    response: GetMessageResponse = await asyncio.wait_for(stub.GetMessage(request), TIMEOUT)
    return response


async def state_of(
    stub: Stub, message_id: str, source: Source.ValueType = Source.SOURCE_UNSPECIFIED
) -> DeliveryReport:
    response = await get_message(stub, GetMessageRequest(message_id=message_id, source=source))
    assert len(response.messages) == 1
    return response.messages[0]


async def history_of(stub: Stub, message_id: str) -> list[DeliveryReport]:
    response = await get_message(stub, GetMessageRequest(message_id=message_id, include_history=True))
    assert not response.history_truncated
    return list(response.history)


# --- waits and clients ---------------------------------------------------------------------------


async def eventually(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]],
    what: str = "the condition",
    *,
    within: float = TIMEOUT,
    interval: float = 0.01,
) -> None:
    """Polls `condition` (sync or async) until it holds; fails the test after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if await result if isinstance(result, Awaitable) else result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within} s: {what}")
        await asyncio.sleep(interval)


async def health(channel: grpc.aio.Channel, service: str) -> int | None:
    """The health status of `service` (grpc.health.v1), or None while it is unknown."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return int(response.status)


def connect(
    running: dlrhub_app.App,
    *,
    token: str | None = None,
    tls: TlsConfig | None = None,
    host: str = "127.0.0.1",
    timeout: float = TIMEOUT,
) -> AsyncClient:
    """The async client on `running`, failing at once instead of reconnecting."""
    return AsyncClient(f"{host}:{running.port}", token=token, tls=tls, timeout=timeout, reconnect_attempts=0)


# --- metrics -------------------------------------------------------------------------------------

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


async def scrape(admin_port: int | None) -> Samples:
    """Every dlrhub_* sample on /metrics, keyed by sample name and labels."""
    assert admin_port is not None, "the admin port is off: set admin_listen"
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.startswith("dlrhub_"):
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One series' value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- processes ---------------------------------------------------------------------------------


async def run(*command: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """A subprocess, off the event loop the server runs on: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(PROCESS_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- errors --------------------------------------------------------------------------------------


@dataclass
class ErrorDetails:
    code: grpc.StatusCode
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: list[str] = field(default_factory=list)
    field_reasons: list[str] = field(default_factory=list)


def details_of(error: grpc.aio.AioRpcError) -> ErrorDetails:
    """The google.rpc.Status details of a failed call (ErrorInfo, BadRequest)."""
    metadata = cast("grpc.aio.Metadata", error.trailing_metadata())  # an aio error's metadata is aio Metadata
    encoded = [value for key, value in metadata if key == "grpc-status-details-bin"]
    assert len(encoded) == 1, "the error carries no google.rpc.Status"
    assert isinstance(encoded[0], bytes)
    status = status_pb2.Status.FromString(encoded[0])
    assert status.code == error.code().value[0]
    infos: list[error_details_pb2.ErrorInfo] = []
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(bad_request.field_violations)
    assert len(infos) == 1
    return ErrorDetails(
        code=error.code(),
        reason=infos[0].reason,
        domain=infos[0].domain,
        metadata=dict(infos[0].metadata),
        fields=[violation.field for violation in violations],
        field_reasons=[violation.reason for violation in violations],
    )


async def failure(call: Awaitable[Any]) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call, TIMEOUT)
    details = details_of(raised.value)
    assert details.domain == "deliveryreport.dlrhub.io"
    assert ErrorReason.Value(details.reason)  # a reason the contract lists (Value raises otherwise)
    assert all(ErrorReason.Value(reason) for reason in details.field_reasons)
    return details


async def stream_failure(call: StreamCall) -> ErrorDetails:
    try:
        return await failure(call.read())
    finally:
        call.cancel()


# --- streams -------------------------------------------------------------------------------------


async def read_message(call: StreamCall) -> StreamResponse:
    message = await asyncio.wait_for(call.read(), TIMEOUT)
    assert isinstance(message, StreamResponse), "the stream ended"
    return message


async def read_changes(call: StreamCall, count: int, within: float = TIMEOUT) -> list[StreamResponse]:
    """The next `count` changes (heartbeats skipped: the 15 s default never fires in these tests)."""
    changes: list[StreamResponse] = []
    async with asyncio.timeout(within):
        while len(changes) < count:
            message = await read_message(call)
            if message.HasField("change"):
                changes.append(message)
    return changes


def position(cursor: str) -> int:
    """The position a cursor of either engine names (the tests compare and order positions)."""
    for cursors in (SqliteStore.cursor_format, PostgresStore.cursor_format):
        parsed = cursors.parse(cursor)
        if parsed is not None:
            return parsed
    raise AssertionError(f"{cursor!r} is no cursor of any engine")


def cursor_text(app: dlrhub_app.App, position: int) -> str:
    """A position as the app's store writes cursors."""
    return app.store.cursor_format.format(position)


def cursors_of(messages: Sequence[StreamResponse]) -> list[int]:
    return [position(message.cursor) for message in messages]


async def read_start(call: StreamCall) -> int:
    """The first message: a heartbeat with the start position, sent as soon as the stream is live."""
    message = await read_message(call)
    assert message.WhichOneof("event") == "heartbeat"
    return position(message.cursor)


@asynccontextmanager
async def streaming(stub: Stub, request: StreamRequest, *, start: int) -> AsyncIterator[StreamCall]:
    """A stream that is live (its first heartbeat, at position `start`, has been read)."""
    call = stub.Stream(request)
    try:
        assert await read_start(call) == start
        yield call
    finally:
        call.cancel()


@dataclass
class OwnServer:
    """A dlrhub started by the test itself, for settings the shared fixture does not have."""

    app: dlrhub_app.App
    stub: Stub
    channel: grpc.aio.Channel
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.app.stop()


@asynccontextmanager
async def own_server(db: Path, clock: FakeClock, *, stream_buffer: int = 1024) -> AsyncIterator[OwnServer]:
    settings = Settings(listen="127.0.0.1:0", db=db, stream_buffer=stream_buffer, shutdown_grace=2.0)
    running = await dlrhub_app.start(settings, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    own = OwnServer(running, DeliveryReportServiceStub(channel), channel)
    try:
        yield own
    finally:
        await own.stop()
        await channel.close(None)
