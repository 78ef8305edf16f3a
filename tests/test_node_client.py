"""A non-Python caller works from the .proto alone: the Node.js client against `dlrhub serve`."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import grpc

from deliveryreport.v1.delivery_report_pb2 import DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from tests.conftest import ROOT, node_executable
from tools import launcher

SCRIPT = ROOT / "client" / "node" / "dlrhub-client.js"
SERVICE = "/deliveryreport.v1.DeliveryReportService"


def _run_client(address: str) -> list[dict[str, Any]]:
    completed = subprocess.run(
        [node_executable(), str(SCRIPT), address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, f"node client failed:\n{completed.stderr}\n{completed.stdout}"
    return [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]


def test_node_client_ingests_gets_and_streams(server_process: launcher.Server) -> None:
    lines = _run_client(server_process.address)
    steps = [line["step"] for line in lines]
    assert steps == ["stream_open", "ingest", "get_message", "stream", "stream", "done"]
    by_step: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_step.setdefault(line["step"], []).append(line.get("response", {}))

    opening = by_step["stream_open"][0]
    assert (opening["event"], opening["heartbeat"]) == ("heartbeat", {})
    assert "change" not in opening

    # Ingest (the FULL view): both items accepted, normalised, with cursors. Default
    # values are left out of the JSON (proto-loader `defaults: false`), e.g. index 0.
    ingest = by_step["ingest"][0]
    assert ingest["accepted_count"] == 2
    assert "duplicate_count" not in ingest
    assert "rejected_count" not in ingest
    results = ingest["results"]
    assert [result.get("index", 0) for result in results] == [0, 1]
    assert [result["outcome"] for result in results] == ["INGEST_OUTCOME_ACCEPTED"] * 2
    reports = [result["report"] for result in results]
    assert [report["status"] for report in reports] == [
        "DELIVERY_STATUS_DELIVERED",
        "DELIVERY_STATUS_EXPIRED",
    ]
    assert all(report["source"] == "SOURCE_GMS" for report in reports)
    assert all(report["channel"] == "CHANNEL_SMS" for report in reports)
    assert all(report["final"] is True for report in reports)
    assert reports[1]["raw"]["gms"]["hyber_status"] == 35015  # int32: a number, not a string
    delivered_id, expired_id = (report["message_id"] for report in reports)
    assert [result["message_id"] for result in results] == [delivered_id, expired_id]
    assert delivered_id != expired_id
    cursors = [result["cursor"] for result in results]
    assert all(cursor.isdigit() for cursor in cursors)
    assert all("raw_payload" not in report for report in reports)  # Ingest does not echo the text
    # The text each report was stored with, as the stream carries it.
    texts = [message["change"]["report"]["raw_payload"] for message in by_step["stream"]]

    # GetMessage: the EXPIRED message's current state and its history of one report.
    fetch = by_step["get_message"][0]
    assert len(fetch["messages"]) == 1
    state = fetch["messages"][0]
    assert state["message_id"] == expired_id
    assert state["status"] == "DELIVERY_STATUS_EXPIRED"
    assert state["recipient"] == "+380962222222"
    assert state["raw"]["gms"] == {
        "status": 3,
        "substatus": 35,
        "_substatus": "substatus",
        "hyber_status": 35015,
        "_hyber_status": "hyber_status",
        "sent_via": "sms",
    }
    assert len(fetch["history"]) == 1
    assert fetch["history"][0]["status"] == "DELIVERY_STATUS_EXPIRED"
    assert fetch["history"][0]["raw_payload"] == texts[1]

    # Stream: exactly the two ingested reports, with the cursors Ingest gave.
    streamed = by_step["stream"]
    assert [message["cursor"] for message in streamed] == cursors
    assert [message["event"] for message in streamed] == ["change", "change"]
    assert [message["change"]["report"]["message_id"] for message in streamed] == [delivered_id, expired_id]
    assert [message["change"]["state"]["status"] for message in streamed] == [
        "DELIVERY_STATUS_DELIVERED",
        "DELIVERY_STATUS_EXPIRED",
    ]
    assert all("heartbeat" not in message for message in streamed)

    # What Node ingested is stored: Python's stub finds both messages.
    with grpc.insecure_channel(server_process.address) as channel:
        stub = DeliveryReportServiceStub(channel)
        for message_id, status, report, text in [
            (delivered_id, DeliveryStatus.DELIVERY_STATUS_DELIVERED, reports[0], texts[0]),
            (expired_id, DeliveryStatus.DELIVERY_STATUS_EXPIRED, reports[1], texts[1]),
        ]:
            fetched = stub.GetMessage(
                GetMessageRequest(message_id=message_id, include_history=True), timeout=10
            )
            assert len(fetched.messages) == 1
            stored = fetched.messages[0]
            assert stored.source == Source.SOURCE_GMS
            assert stored.status == status
            assert stored.reference == report["reference"]
            assert stored.raw_payload == text
            assert json.loads(text)["message_id"] == message_id
            assert [entry.raw_payload for entry in fetched.history] == [text]


class _OlderServer(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A dlrhub from before StreamBatches: forwards every other method to a real one, as bytes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.methods: list[str] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method
        if method.endswith("/StreamBatches"):
            return None  # UNIMPLEMENTED
        self.methods.append(method)
        if method.endswith("/Stream"):

            async def stream(request: bytes, context: object) -> AsyncIterator[bytes]:
                async for response in self.channel.unary_stream(method, None, None)(request):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(request: bytes, context: object) -> bytes:
            answer: bytes = await self.channel.unary_unary(method, None, None)(request)
            return answer

        return grpc.unary_unary_rpc_method_handler(unary)


async def test_node_client_falls_back_to_stream_on_a_server_without_stream_batches(
    server_process: launcher.Server,
) -> None:
    async with grpc.aio.insecure_channel(server_process.address) as channel:
        older = _OlderServer(channel)
        proxy = grpc.aio.server()
        proxy.add_generic_rpc_handlers((older,))
        port = proxy.add_insecure_port("127.0.0.1:0")
        await proxy.start()
        try:
            lines = await asyncio.to_thread(_run_client, f"127.0.0.1:{port}")
        finally:
            await proxy.stop(None)
    assert [line["step"] for line in lines] == [
        "stream_open",
        "ingest",
        "get_message",
        "stream",
        "stream",
        "done",
    ]
    ingested = [result["report"]["message_id"] for result in lines[1]["response"]["results"]]
    assert [line["response"]["change"]["report"]["message_id"] for line in lines[3:5]] == ingested
    assert f"{SERVICE}/Stream" in older.methods
