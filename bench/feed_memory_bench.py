"""Benchmark: the server's resident memory while large reports are ingested past a slow Stream reader.

The live feed buffers each subscriber's changes (and the encoder keeps their encodings) until they are
sent. With a buffer counted in changes, large reports (the raw text of each is kept, in the report and
in the message's state) made that memory follow the report size: 286 MiB of ~60 KiB reports left
1.27 GB resident. The buffer and the encodings are now bounded in bytes (`DLRHUB_STREAM_BUFFER_BYTES`).

Run from the repository root:

    .venv/bin/python -m bench.feed_memory_bench                       # 286 MiB, about a minute
    .venv/bin/python -m bench.feed_memory_bench --mib 100 --item-kib 32

It starts the real `dlrhub serve` as a subprocess on a fresh SQLite file, opens one Stream that reads
`--read-rate` changes per second (slower than Ingest), and ingests `--mib` MiB of SentSMSReport reports
of `--item-kib` KiB each (a long `callbackData`), `--batch` per call from `--writers` concurrent
clients. It prints the server's VmRSS (from /proc) before, at the end of Ingest, once the reader has
read everything, and after `--idle` seconds more, with the peak (VmHWM) and the
`dlrhub_stream_buffered_bytes` gauge (and its greatest value, sampled every 0.1 s); and it checks
that the reader received every change once, in cursor order. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.duration_pb2 import Duration

from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestRequest, StreamRequest, StreamResponse
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from tools import launcher

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

RPC_TIMEOUT = 60.0
MIB = 1 << 20


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM")}


def gauge(admin_address: str, name: str) -> float | None:
    """A metric's value from the admin port's /metrics, or None when it is not there."""
    with urllib.request.urlopen(f"http://{admin_address}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def payload(prefix: str, count: int, item_bytes: int) -> str:
    """`count` SentSMSReport reports of about `item_bytes` each."""
    padding = "x" * max(0, item_bytes - 300)
    results = [
        {
            "messageId": f"{prefix}-{index}",
            "to": "41793026727",
            "doneAt": "2024-01-01T00:00:00.000+0000",
            "status": {"groupId": 3, "id": 5, "name": "DELIVERED_TO_HANDSET"},
            "callbackData": padding,
        }
        for index in range(count)
    ]
    return json.dumps({"results": results})


async def bench(options: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="dlrhub-bench-") as directory,
        launcher.start(Path(directory) / "bench.db", keep=200) as server,
    ):
        await measure(server, options)


def line(label: str, pid: int, admin_address: str) -> None:
    now = memory(pid)
    buffered = gauge(admin_address, "dlrhub_stream_buffered_bytes")
    extra = "" if buffered is None else f"  buffered {buffered / MIB:7.1f} MiB"
    print(f"  {label:<28} RSS {now['VmRSS'] / MIB:7.1f} MiB  peak {now['VmHWM'] / MIB:7.1f} MiB{extra}")


async def sample_buffered(admin_address: str, most: list[float]) -> None:
    """Keeps the greatest `dlrhub_stream_buffered_bytes` in most[0], sampled every 0.1 s (until
    cancelled)."""
    while True:
        buffered = await asyncio.to_thread(gauge, admin_address, "dlrhub_stream_buffered_bytes")
        most[0] = max(most[0], buffered or 0.0)
        await asyncio.sleep(0.1)


async def read_slowly(
    responses: AsyncIterator[StreamResponse], rate: float, until: asyncio.Future[int]
) -> list[int]:
    """The cursors of the changes read, `rate` a second, up to the cursor `until` resolves to."""
    cursors: list[int] = []
    next_read = time.monotonic()
    while not until.done() or not cursors or cursors[-1] < until.result():
        response = await asyncio.wait_for(anext(responses), RPC_TIMEOUT)
        if response.HasField("heartbeat"):
            continue
        cursors.append(int(response.cursor))
        next_read += 1 / rate
        await asyncio.sleep(max(0.0, next_read - time.monotonic()))
    return cursors


async def ingest(stub: DeliveryReportServiceAsyncStub, options: argparse.Namespace, total: int) -> int:
    """`total` reports, `options.batch` per call from `options.writers` clients; the last cursor."""
    calls = list(range(-(-total // options.batch)))
    cursors = [0]

    async def write(writer: int) -> None:
        while calls:
            call = calls.pop()
            count = min(options.batch, total - call * options.batch)
            text = payload(f"w{writer}-c{call}", count, options.item_kib * 1024)
            request = IngestRequest(payload=text, format=Format.FORMAT_SENT_SMS_REPORT)
            response = await stub.Ingest(request, timeout=RPC_TIMEOUT)
            assert response.accepted_count == count, response
            cursors.extend(int(result.cursor) for result in response.results)

    await asyncio.gather(*(write(writer) for writer in range(options.writers)))
    return max(cursors)


async def measure(server: launcher.Server, options: argparse.Namespace) -> None:
    total = int(options.mib * MIB) // (options.item_kib * 1024)
    print(
        f"{total} reports of {options.item_kib} KiB ({total * options.item_kib / 1024:.0f} MiB),"
        f" {options.batch} per call, {options.writers} writers; a Stream reading {options.read_rate}/s"
    )
    line("idle", server.pid, server.admin_address)
    unlimited = [("grpc.max_receive_message_length", -1)]
    async with (
        grpc.aio.insecure_channel(server.address, options=unlimited) as channel,
        grpc.aio.insecure_channel(server.address) as reader_channel,
    ):
        stream = DeliveryReportServiceStub(reader_channel).Stream(
            StreamRequest(heartbeat_interval=Duration(seconds=1)), timeout=3600
        )
        responses = stream.__aiter__()
        start = await asyncio.wait_for(anext(responses), RPC_TIMEOUT)
        assert start.HasField("heartbeat")
        last: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        most_buffered = [0.0]
        reading = asyncio.create_task(read_slowly(responses, options.read_rate, last))
        sampling = asyncio.create_task(sample_buffered(server.admin_address, most_buffered))

        started = time.monotonic()
        last.set_result(await ingest(DeliveryReportServiceStub(channel), options, total))
        print(f"  ingested in {time.monotonic() - started:.1f} s")
        line("end of Ingest", server.pid, server.admin_address)
        cursors = await reading
        sampling.cancel()
        stream.cancel()
        print(f"  the most buffered, sampled every 0.1 s: {most_buffered[0] / MIB:.1f} MiB")
        line("reader caught up", server.pid, server.admin_address)
        complete = cursors == list(range(int(start.cursor) + 1, last.result() + 1))
        print(f"  the reader got every change once, in order: {'yes' if complete else 'NO'}")
        await asyncio.sleep(options.idle)
        line(f"after {options.idle:g} s idle", server.pid, server.admin_address)
        if not complete:
            raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=286, help="MiB of reports to ingest")
    parser.add_argument("--item-kib", type=int, default=60, help="size of each report's item, KiB")
    parser.add_argument("--batch", type=int, default=16, help="reports per Ingest call")
    parser.add_argument("--writers", type=int, default=4, help="concurrent Ingest clients")
    parser.add_argument("--read-rate", type=float, default=300, help="changes per second the reader reads")
    parser.add_argument("--idle", type=float, default=5, help="seconds idle before the last measure")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
