"""One request never stalls everything: a 16 MiB body of tiny items is refused quickly, naming the
limit, in bounded memory, while health and other calls go on answering.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1.delivery_report_service_pb2 import FetchRequest, IngestRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from tests.conftest import start_server_process

TIMEOUT = 10.0
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
    server = start_server_process(db_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = DeliveryReportServiceStub(channel)
            small = json.dumps({"message_id": "small-1", "status": 2})
            stub.Ingest(IngestRequest(payload=small), timeout=TIMEOUT)
            with health_checked_throughout(server.address) as failures:
                assert send(shape, server.address, server.http_address) == expected
                [state] = stub.Fetch(FetchRequest(message_id="small-1"), timeout=2.0).reports
                assert state.message_id == "small-1"
            assert failures == []
        assert peak_kb(server.process.pid) < PEAK_BOUND_KB
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
