"""Load generators, each in its own process with its own channel.

The bench (bench/measurement.py) starts a pool of these processes once (multiprocessing, spawn)
and hands each a job (a dict) per measurement point; the process answers a result dict. Every job
has a shared measurement window on the wall clock (time.time_ns(), the same clock in every process
of the machine): load starts `warmup` seconds before `start_at`, and only what completes inside
[start_at, start_at + duration) is counted.

Job kinds:
  unary          closed loop with `concurrency` calls in flight (or, with `rate`, an open loop paced
                 at `rate` calls/s with at most `concurrency` in flight), identity serializers;
                 payload "ingest" (one fresh report per IngestRequest), "batch" (`batch` reports
                 per IngestRequest), "fetch" (a GetMessageRequest for a random stored message id) or
                 "fetch_history" (the same with include_history).
                 The same bytes go to dlrhub or to the echo server, so the client does the same work.
  client_stream  `concurrency` client-streaming calls at a time, `messages` single-report
                 IngestRequests each (echo ceiling of batched ingest).
  server_stream  one server-streaming call, counting messages (echo ceiling of Stream fan-out).
  subscribe      one dlrhub Stream or StreamBatches subscription (`method`); mode "count" counts
                 changes (a Stream message is never parsed), mode "record" parses each and records
                 (message_id, receive time).

With `subscriber_client` "node", server_stream and subscribe jobs run in bench/subscriber.js
(@grpc/grpc-js) instead, with the same window and result: a Python subscriber costs about four
times the CPU per message, and ten of them on two cores measure mostly themselves.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing.queues
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from bench.common import (
    BENCH,
    CHANNEL_OPTIONS,
    INGEST,
    STREAM_BATCHES,
    gms_batch,
    gms_report,
    live_id,
    stored_id,
)
from bench.echo_server import SERVER_STREAM_REQUEST
from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    IngestRequest,
    IngestResponse,
    StreamBatchesRequest,
    StreamBatchesResponse,
    StreamRequest,
    StreamResponse,
)

Job = dict[str, Any]
# What read() answers once a stream has ended (grpc-stubs lacks it).
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
Result = dict[str, Any]
# A request factory: the request bytes, its message id (when it carries exactly one report) and
# the number of reports in it.
Factory = Callable[[], tuple[bytes, str | None, int]]

FETCH_POOL = 8192
MAX_LATENCIES = 400_000


def worker_main(
    worker: int,
    jobs: multiprocessing.queues.Queue[Job | None],
    results: multiprocessing.queues.Queue[Result],
) -> None:
    """A load process: runs jobs until it is handed None."""
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            result = asyncio.run(run(job))
        except Exception:
            result = {"failed": traceback.format_exc()}
        result["worker"] = worker
        result["job_id"] = job.get("job_id")
        results.put(result)


async def run(job: Job) -> Result:
    if job["kind"] == "ping":  # the process is up and has imported everything
        return {}
    if job["kind"] in ("server_stream", "subscribe") and job.get("subscriber_client") == "node":
        return await _node_subscriber(job)
    kinds = {
        "unary": _unary,
        "client_stream": _client_stream,
        "server_stream": _server_stream,
        "subscribe": _subscribe,
    }
    async with grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 15)
        window = _Window(job)
        cpu = _CpuWindow(window)
        result = await kinds[job["kind"]](channel, job, window)
        result.update(cpu.result())
        return result


class _Window:
    def __init__(self, job: Job) -> None:
        self.start = int(job["start_at"] * 1e9)
        self.end = self.start + int(job["duration"] * 1e9)
        self.begin = self.start - int(job.get("warmup", 0) * 1e9)
        self.duration = job["duration"]

    def inside(self, ns: int) -> bool:
        return self.start <= ns < self.end

    async def sleep_until(self, ns: int) -> None:
        delay = (ns - time.time_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)


class _CpuWindow:
    """This process's CPU seconds inside the measurement window."""

    def __init__(self, window: _Window) -> None:
        loop = asyncio.get_running_loop()
        self.marks: list[float] = []
        now = time.time_ns()
        for at in (window.start, window.end):
            loop.call_later(max(0.0, (at - now) / 1e9), lambda: self.marks.append(time.process_time()))

    def result(self) -> Result:
        if not self.marks:
            return {}
        end = (
            self.marks[1] if len(self.marks) > 1 else time.process_time()
        )  # the job ended at the window's end
        return {"client_cpu_s": end - self.marks[0]}


def _factory(job: Job) -> Factory:
    payload = job["payload"]
    worker, tag = job["worker_index"], job["tag"]
    sequence = itertools.count()
    if payload == "ingest":

        def ingest() -> tuple[bytes, str | None, int]:
            n = next(sequence)
            message_id = live_id(tag, worker, n)
            return IngestRequest(payload=gms_report(message_id, n)).SerializeToString(), message_id, 1

        return ingest
    if payload == "batch":
        size = job["batch"]

        def batch() -> tuple[bytes, str | None, int]:
            first = next(sequence) * size
            ids = [live_id(tag, worker, first + n) for n in range(size)]
            return IngestRequest(payload=gms_batch(ids, first)).SerializeToString(), None, size

        return batch
    if payload in ("fetch", "fetch_history"):
        chooser = random.Random(f"{tag}-{worker}")  # load, not security
        stored, history = job["stored"], payload == "fetch_history"
        pool = [
            GetMessageRequest(
                message_id=stored_id(chooser.randrange(stored)), include_history=history
            ).SerializeToString()
            for _ in range(FETCH_POOL)
        ]
        cycle = itertools.cycle(pool)

        def fetch() -> tuple[bytes, str | None, int]:
            return next(cycle), None, 1

        return fetch
    raise ValueError(f"unknown payload {payload!r}")


async def _unary(channel: grpc.aio.Channel, job: Job, window: _Window) -> Result:
    call = channel.unary_unary(job["method"], None, None)  # identity: bytes in, bytes out
    make = _factory(job)
    check_ingest = job["method"] == INGEST
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    records: list[tuple[str, int, int]] = []
    totals = {"calls": 0, "items": 0, "not_accepted": 0, "late_ns": 0}
    record_ids = bool(job.get("record_ids"))

    async def once(request: bytes, message_id: str | None, items: int) -> None:
        sent = time.time_ns()
        try:
            response = await call(request, timeout=60)
        except grpc.aio.AioRpcError as error:
            if window.inside(time.time_ns()):
                errors[error.code().name] += 1
            await asyncio.sleep(0.005)
            return
        done = time.time_ns()
        if record_ids and message_id is not None and window.inside(sent):
            records.append((message_id, sent, done))
        if not window.inside(done):
            return
        totals["calls"] += 1
        totals["items"] += items
        if len(latencies) < MAX_LATENCIES:
            latencies.append((done - sent) // 1000)
        if check_ingest:
            accepted = IngestResponse.FromString(response).accepted_count
            totals["not_accepted"] += items - accepted

    await window.sleep_until(window.begin)
    rate = job.get("rate")
    if rate:
        totals["late_ns"] = await _open_loop(once, make, rate, job["concurrency"], window)
    else:

        async def closed_loop() -> None:
            while time.time_ns() < window.end:
                await once(*make())

        await asyncio.gather(*(closed_loop() for _ in range(job["concurrency"])))
    return {
        **totals,
        "errors": dict(errors),
        "latencies_us": latencies,
        "records": records,
    }


async def _open_loop(
    once: Callable[[bytes, str | None, int], Awaitable[None]],
    make: Factory,
    rate: float,
    in_flight: int,
    window: _Window,
) -> int:
    """Call n is due at begin + n / rate, with at most `in_flight` calls at once; the worst lag (ns)."""
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[None]] = set()
    worst = 0

    async def paced(request: bytes, message_id: str | None, items: int) -> None:
        try:
            await once(request, message_id, items)
        finally:
            slots.release()

    for n in itertools.count():
        due = window.begin + int(n * 1e9 / rate)
        if due >= window.end:
            break
        await window.sleep_until(due)
        await slots.acquire()
        worst = max(worst, time.time_ns() - due)
        task = asyncio.create_task(paced(*make()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return worst


async def _client_stream(channel: grpc.aio.Channel, job: Job, window: _Window) -> Result:
    call = channel.stream_unary(job["method"], None, None)
    make = _factory({**job, "payload": "ingest"})
    messages = [make()[0] for _ in range(job["messages"])]
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    totals = {"calls": 0, "items": 0}

    async def loop() -> None:
        while time.time_ns() < window.end:
            sent = time.time_ns()
            try:
                response = await call(iter(messages), timeout=60)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                await asyncio.sleep(0.005)
                continue
            done = time.time_ns()
            if window.inside(done):
                totals["calls"] += 1
                totals["items"] += int.from_bytes(response, "big")
                latencies.append((done - sent) // 1000)

    await window.sleep_until(window.begin)
    await asyncio.gather(*(loop() for _ in range(job["concurrency"])))
    return {**totals, "errors": dict(errors), "latencies_us": latencies}


async def _server_stream(channel: grpc.aio.Channel, job: Job, window: _Window) -> Result:
    request = SERVER_STREAM_REQUEST.pack(2**40, job["size"])
    await window.sleep_until(window.begin)
    call = channel.unary_stream(job["method"], None, None)(request)
    asyncio.get_running_loop().call_later((window.end - time.time_ns()) / 1e9, call.cancel)
    messages = 0
    try:
        while True:
            message = await call.read()
            if message is EOF:
                break
            if window.inside(time.time_ns()):
                messages += 1
    except asyncio.CancelledError:
        pass
    return {"messages": messages, "errors": {}}


async def _node_subscriber(job: Job) -> Result:
    """The job run by bench/subscriber.js; its result."""
    request = (
        SERVER_STREAM_REQUEST.pack(2**40, job["size"])
        if job["kind"] == "server_stream"
        else _subscribe_request(job["method"])
    )
    keys = ("target", "kind", "method", "start_at", "warmup", "duration", "mode", "grace")
    spec = {key: job[key] for key in keys if key in job} | {"request": request.hex()}
    process = await asyncio.create_subprocess_exec(
        "node",
        str(BENCH / "subscriber.js"),
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"bench/subscriber.js failed ({process.returncode}): {err.decode()[-2000:]}")
    result: Result = json.loads(out)
    if "records" in result:
        result["records"] = [tuple(record) for record in result["records"]]
    return result


def _items(batch: bytes) -> int:
    """The StreamResponses in an encoded StreamBatchesResponse, counted off the wire without parsing
    them (it has only field 1, length-delimited: a tag byte and a varint length before each)."""
    count = position = 0
    while position < len(batch):
        position += 1  # the tag
        length = shift = 0
        while True:
            byte = batch[position]
            position += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        position += length
        count += 1
    return count


def _subscribe_request(method: str) -> bytes:
    """A live subscription's request, for Stream or StreamBatches."""
    request = StreamRequest(heartbeat_interval=Duration(seconds=60))
    if method == STREAM_BATCHES:
        return StreamBatchesRequest(stream=request).SerializeToString()
    return request.SerializeToString()


async def _subscribe(channel: grpc.aio.Channel, job: Job, window: _Window) -> Result:
    """One Stream (or StreamBatches) subscription: live from now; counts (or records) every change
    it receives."""
    record = job.get("mode") == "record"
    batched = job["method"] == STREAM_BATCHES
    method = channel.unary_stream(job["method"], None, None)
    call = method(_subscribe_request(job["method"]))
    first = await call.read()  # the opening heartbeat: the subscription is live
    ready_at = time.time_ns()
    stop_at = window.end + int(job.get("grace", 0) * 1e9)
    asyncio.get_running_loop().call_later((stop_at - time.time_ns()) / 1e9, call.cancel)
    messages = grpc_messages = 0
    records: list[tuple[str, int]] = []
    errors: Counter[str] = Counter()
    try:
        while first is not EOF:
            message = await call.read()
            if message is EOF:
                break
            now = time.time_ns()
            assert isinstance(message, bytes)
            count = _items(message) if batched else 1
            if record:
                responses = (
                    StreamBatchesResponse.FromString(message).responses
                    if batched
                    else [StreamResponse.FromString(message)]
                )
                records += [
                    (r.change.report.message_id, now) for r in responses if not r.HasField("heartbeat")
                ]
            if window.inside(now):
                messages += count
                grpc_messages += 1
    except asyncio.CancelledError:
        pass
    except grpc.aio.AioRpcError as error:
        errors[error.code().name] += 1
    return {
        "messages": messages,
        "grpc_messages": grpc_messages,
        "records": records,
        "ready_at": ready_at,
        "late": ready_at > window.begin,
        "errors": dict(errors),
    }
