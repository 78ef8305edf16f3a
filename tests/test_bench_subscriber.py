"""The benchmark's Node subscriber (bench/subscriber.js) against a real server: it must see every change
and read each one's message id off the wire, or the fan-out and latency figures would be wrong."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import given
from hypothesis import strategies as st

from bench import load
from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    IngestRequest,
    StreamBatchesRequest,
    StreamBatchesResponse,
    StreamChange,
    StreamRequest,
    StreamResponse,
)
from tests.conftest import ROOT, Running, node_executable
from tests.helpers import TIMEOUT, eventually

SCRIPT = ROOT / "bench" / "subscriber.js"


def _gms(message_id: str) -> str:
    return json.dumps({"message_id": message_id, "status": 2, "substatus": 23, "time": 1_700_000_000_000})


@pytest.mark.parametrize("rpc", ["Stream", "StreamBatches"])
async def test_the_node_subscriber_records_every_change_with_its_message_id(
    server: Running, rpc: str
) -> None:
    request = StreamRequest(heartbeat_interval=Duration(seconds=60))
    start_at = time.time() + 3.0  # Node starts in well under a second, even on a busy machine
    job = {
        "target": server.address,
        "kind": "subscribe",
        "method": f"/deliveryreport.v1.DeliveryReportService/{rpc}",
        "request": (request if rpc == "Stream" else StreamBatchesRequest(stream=request))
        .SerializeToString()
        .hex(),
        "start_at": start_at,
        "warmup": 0,
        "duration": 3600.0,  # the stream's end ends it, not the window's
        "mode": "record",
    }
    subscriber = await asyncio.create_subprocess_exec(
        node_executable(),
        str(SCRIPT),
        json.dumps(job),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    while server.app.hub.subscriber_count == 0:  # the subscription is live
        assert time.time() < start_at, "the Node subscriber did not subscribe before its window"
        await asyncio.sleep(0.05)
    await asyncio.sleep(start_at - time.time() + 0.1)  # until the window opens
    ids = [f"bench-{n}" for n in range(5)] + ["ünïcode-ид"]
    for message_id in ids:
        await server.stub.Ingest(IngestRequest(payload=_gms(message_id)))
    together = [f"together-{n}" for n in range(3)]  # one commit: one StreamBatches message
    await server.stub.Ingest(IngestRequest(payload="[" + ",".join(map(_gms, together)) + "]"))
    ids += together
    # Once the server has sent it every change, the stream ends (as at shutdown), and so does Node.
    hub = server.app.hub
    await eventually(lambda: all(s.position == hub.latest_cursor for s in hub.subscriptions), "all sent")
    hub.close()
    try:
        out, err = await asyncio.wait_for(subscriber.communicate(), TIMEOUT)
    finally:
        if subscriber.returncode is None:
            subscriber.kill()
            await subscriber.wait()
    assert subscriber.returncode == 0, err.decode()
    result = json.loads(out)

    assert [message_id for message_id, _ in result["records"]] == ids
    assert result["messages"] == len(ids)  # all inside the window; the opening heartbeat not counted
    assert result["grpc_messages"] == (len(ids) if rpc == "Stream" else len(ids) - 2)
    assert result["errors"] == {}
    assert result["late"] is False  # live before the window opened
    received = [at for _, at in result["records"]]
    assert received == sorted(received)
    assert all(abs(at / 1e9 - time.time()) < 60 for at in received)  # wall-clock nanoseconds
    assert result["client_cpu_s"] >= 0


@given(sizes=st.lists(st.integers(min_value=0, max_value=3000), max_size=30))
def test_the_python_subscriber_counts_the_changes_of_a_batch_without_parsing_it(sizes: list[int]) -> None:
    batch = StreamBatchesResponse(
        responses=[
            StreamResponse(
                cursor=str(cursor), change=StreamChange(report=DeliveryReport(message_id="x" * size))
            )
            for cursor, size in enumerate(sizes, start=1)
        ]
    )
    assert load._items(batch.SerializeToString()) == len(sizes)
