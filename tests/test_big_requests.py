"""One request never stalls everything: a 16 MiB body of tiny items is refused quickly, naming the
limit, in bounded memory, while health and other calls go on answering; a big valid payload is
normalised off the event loop; payloads being written hold a budget of bytes, and wait their turn.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1.delivery_report_pb2 import Channel
from deliveryreport.v1.delivery_report_service_pb2 import (
    Format,
    GetMessageRequest,
    IngestRequest,
    IngestResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.normalise import NormalisedItem, Normaliser
from dlrhub.write.budget import ByteBudget
from dlrhub.write.writer import INLINE_BYTES
from tests.conftest import FakeClock
from tests.helpers import TIMEOUT, eventually
from tools import launcher

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

MAX_REQUEST = 16 * 1024 * 1024
# The most memory a server may take for one refused 16 MiB request (it took 3-6 GB).
PEAK_BOUND_KB = 512 * 1024
INGEST = "/deliveryreport.v1.DeliveryReportService/Ingest"
TOO_MANY = "more than 10000 items in one payload (at most 10000): split the batch"


def tiny_items(budget: int) -> str:
    """A GMS batch of `0` items that just fits in `budget` bytes: 8 million of them in 16 MiB."""
    return "[" + ",".join(["0"] * ((budget - 2) // 2)) + "]"


def empty_typed_reports(budget: int) -> bytes:
    """An encoded IngestRequest whose `gms` body holds as many empty reports as fit in `budget`:
    each takes 2 bytes on the wire (built as bytes: as messages they would take gigabytes here too)."""
    count = (budget - 8) // 2
    reports = b"\x0a\x00" * count
    length, size = bytearray(), len(reports)
    while True:
        length.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    return b"\x1a" + bytes(length) + reports


def peak_kb(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@contextmanager
def health_checked_throughout(address: str) -> Iterator[list[str]]:
    """Health Checks (each with a 2 s deadline) every 50 ms while the block runs; the failures."""
    failures: list[str] = []
    done = threading.Event()
    answered = threading.Event()

    def check() -> None:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not done.is_set():
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    answered.set()
                except grpc.RpcError as error:
                    failures.append(f"{error.code()}")
                done.wait(0.05)

    checker = threading.Thread(target=check)
    checker.start()
    try:
        assert answered.wait(TIMEOUT)
        yield failures
    finally:
        done.set()
        checker.join()


def send(shape: str, address: str, http_address: str) -> tuple[int | str, str]:
    """The 16 MiB request of `shape`; the code (HTTP status or gRPC code name) and error text."""
    if shape in ("webhook", "xml"):
        elements = "<DeliveryReport>" + "<a/>" * 4_000_000 + "</DeliveryReport>"  # 16 MB of them
        body = tiny_items(MAX_REQUEST) if shape == "webhook" else elements
        answer = httpx.post(f"http://{http_address}/webhooks/gms", content=body, timeout=60)
        return answer.status_code, answer.json()["error"]["description"]
    options = [("grpc.max_send_message_length", MAX_REQUEST)]
    with grpc.insecure_channel(address, options=options) as channel:
        if shape == "payload":
            request = IngestRequest(payload=tiny_items(MAX_REQUEST - 16)).SerializeToString()
        else:
            request = empty_typed_reports(MAX_REQUEST)
        ingest = channel.unary_unary(INGEST, request_serializer=bytes, response_deserializer=bytes)
        try:
            ingest(request, timeout=60)
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""
    raise AssertionError("accepted")


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("webhook", (413, TOO_MANY)),
        ("payload", ("INVALID_ARGUMENT", TOO_MANY)),
        ("typed", ("INVALID_ARGUMENT", TOO_MANY)),
        ("xml", (400, "invalid XML: more than 1000 elements: not one report")),
    ],
)
def test_a_16_mib_body_of_tiny_items_is_refused_quickly_in_bounded_memory_while_health_answers(
    db_path: Path, shape: str, expected: tuple[int | str, str]
) -> None:
    with launcher.start(db_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = DeliveryReportServiceStub(channel)
            small = json.dumps({"message_id": "small-1", "status": 2})
            stub.Ingest(IngestRequest(payload=small), timeout=TIMEOUT)
            with health_checked_throughout(server.address) as failures:
                assert send(shape, server.address, server.http_address) == expected
                [state] = stub.GetMessage(GetMessageRequest(message_id="small-1"), timeout=2.0).messages
                assert state.message_id == "small-1"
            assert failures == []
        assert peak_kb(server.pid) < PEAK_BOUND_KB


class GatedNormaliser(Normaliser):
    """The shipped normaliser, recording the thread each payload is normalised on, and holding a big
    payload (over INLINE_BYTES) until `gate` opens, as a slow one would."""

    def __init__(self) -> None:
        shipped = Normaliser.load()
        super().__init__(shipped.gms_table, shipped.sent_sms_report_table)
        self.gate = threading.Event()
        self.threads: list[tuple[int, str]] = []  # (payload size, thread name)

    def normalise(
        self,
        payload: str,
        format: Format.ValueType,
        received: Timestamp,
        *,
        default_channel: Channel.ValueType = Channel.CHANNEL_SMS,
        max_items: int | None = None,
    ) -> list[NormalisedItem]:
        self.threads.append((len(payload), threading.current_thread().name))
        if len(payload) > INLINE_BYTES:
            assert self.gate.wait(TIMEOUT)
        return super().normalise(
            payload, format, received, default_channel=default_channel, max_items=max_items
        )


def batch(prefix: str, count: int) -> str:
    """A GMS batch of `count` reports of ~280 bytes each."""
    report = {"status": 2, "time": 1477417294667, "extra_id": "x" * 200}
    return json.dumps([{"message_id": f"{prefix}-{number}", **report} for number in range(count)])


async def ingest(stub: DeliveryReportServiceAsyncStub, payload: str) -> IngestResponse:
    return await stub.Ingest(IngestRequest(payload=payload), timeout=TIMEOUT)


async def started(tmp_path: Path, normaliser: Normaliser, **settings: Any) -> app.App:
    return await app.start(
        Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "dlrhub.db", **settings),
        normaliser=normaliser,
        clock=FakeClock(),
    )


async def post_gms(running: app.App, payload: str) -> int:
    """POSTs a GMS payload to the webhook; the number of reports accepted."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}", timeout=TIMEOUT) as http:
        answer = await http.post("/webhooks/gms", content=payload)
    assert answer.status_code == 200, answer.text
    accepted: int = answer.json()["accepted"]
    return accepted


@pytest.mark.parametrize("via", ["ingest", "webhook"])
async def test_a_big_payload_is_normalised_off_the_event_loop_and_a_small_one_on_it(
    tmp_path: Path, via: str
) -> None:
    normaliser = GatedNormaliser()
    running = await started(tmp_path, normaliser)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = DeliveryReportServiceStub(channel)

            async def send(payload: str) -> int:
                if via == "webhook":
                    return await post_gms(running, payload)
                return (await ingest(stub, payload)).accepted_count

            assert await send(batch("small", 2)) == 2
            big = asyncio.ensure_future(send(batch("big", 500)))
            await eventually(lambda: len(normaliser.threads) == 2, "the big payload is being normalised")
            # Held on its worker thread, the big payload stalls nothing: health and GetMessage answer.
            health = health_pb2_grpc.HealthStub(channel)
            checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            fetched = await stub.GetMessage(GetMessageRequest(message_id="small-1"), timeout=2.0)
            assert [state.message_id for state in fetched.messages] == ["small-1"]
            assert not big.done()
            normaliser.gate.set()
            assert await big == 500
            stored = await stub.GetMessage(GetMessageRequest(message_id="big-499"), timeout=2.0)
            assert [state.message_id for state in stored.messages] == ["big-499"]
    finally:
        normaliser.gate.set()
        await running.stop()
    [(small_size, small_thread), (big_size, big_thread)] = normaliser.threads
    assert small_size <= INLINE_BYTES < big_size
    assert small_thread == "MainThread"
    assert big_thread.startswith("dlrhub-normaliser")


async def test_payloads_over_the_write_budget_wait_their_turn(tmp_path: Path) -> None:
    """With room for one big payload at a time, a second waits until the first is committed; a
    small one waits behind it too (first come, first served)."""
    normaliser = GatedNormaliser()
    one = batch("one", 500)
    running = await started(tmp_path, normaliser, write_budget_bytes=len(one) + 100)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = DeliveryReportServiceStub(channel)
            first = asyncio.ensure_future(ingest(stub, one))
            await eventually(lambda: len(normaliser.threads) == 1, "the first is being normalised")
            second = asyncio.ensure_future(ingest(stub, batch("two", 500)))
            third = asyncio.ensure_future(ingest(stub, batch("three", 1)))
            await eventually(lambda: running.writer.budget.waiting == 2, "both arrive, and wait")
            assert len(normaliser.threads) == 1
            assert not second.done()
            assert not third.done()
            normaliser.gate.set()
            answers = [await call for call in (first, second, third)]
            assert [answer.accepted_count for answer in answers] == [500, 500, 1]
    finally:
        normaliser.gate.set()
        await running.stop()
    sizes = [len(one), len(batch("two", 500)), len(batch("three", 1))]
    assert [size for size, _ in normaliser.threads] == sizes


async def test_a_caller_that_gives_up_waiting_leaves_the_budget_queue() -> None:
    budget = ByteBudget(100)
    held = await budget.take(80)
    waiting = asyncio.ensure_future(budget.take(50))
    behind = asyncio.ensure_future(budget.take(20))
    await asyncio.sleep(0)
    assert not waiting.done()
    assert not behind.done()  # first come, first served: 20 would fit, but waits its turn
    assert budget.waiting == 2
    waiting.cancel()
    assert await behind == 20  # the one that gave up no longer holds up those behind it
    assert budget.used == 100
    budget.give(held)
    budget.give(20)
    assert await budget.take(500) == 100  # a payload bigger than the budget takes all of it
    assert budget.used == 100
