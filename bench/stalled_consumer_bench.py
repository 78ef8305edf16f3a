"""Benchmark: ingest throughput with no Stream consumer vs with one stalled consumer, in the same run.

A stalled consumer opens a Stream and then reads nothing. Publishing never waits for a subscriber
(its bounded buffer overflows and it later catches up from the store), so the target is that the
stall lowers ingest throughput by less than 10%.

Run from the repository root:

    .venv/bin/python -m bench.stalled_consumer_bench                      # about 25 s
    .venv/bin/python -m bench.stalled_consumer_bench --stall-seconds 30   # the 30 s stall of the issue
    .venv/bin/python -m bench.stalled_consumer_bench --repeat 3           # the median of three runs

It starts the real `dlrhub serve` as a subprocess on a fresh SQLite file (WAL, synchronous=FULL)
and drives it from this process with `--writers` concurrent clients, each sending Ingest calls of
`--batch` GMS reports with unique message ids, in three phases:

  1. baseline, no stream, for half of `--seconds`;
  2. stalled, for `--stall-seconds`: a Stream is opened (live from now), its first heartbeat read,
     and then nothing is read from it;
  3. baseline again, for the other half of `--seconds` (after the stalled consumer has drained and
     closed), so that a slow drift over the run (the file growing) does not bias the comparison.

It prints acknowledged reports per second for each phase and the ratio stalled / baseline (the
baseline being both baseline phases together). After the stalled phase the consumer reads again,
and the benchmark checks that it receives every change of that phase, in cursor order, exactly
once, and says how long that took.

It also prints the server process's CPU time per report in each phase (from /proc, on Linux):
on a machine with other load on it, throughput moves by tens of percent from run to run, while
the CPU cost per report shows what the stalled consumer itself costs.

`--repeat N` runs the three phases N times on the same server and prints the median ratio (useful
on a machine with other load on it: the figures of one run move by tens of percent with it).
`--no-bdp` turns off BDP probing on the consumer's channel, so its HTTP/2 window stays at 64 KiB
and the stall reaches the server after a few hundred changes (by default the client's transport
first takes megabytes into its own buffers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.duration_pb2 import Duration

from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestRequest, StreamRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from tools import launcher

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

RPC_TIMEOUT = 30.0


@dataclass
class Phase:
    name: str
    seconds: float
    reports: int = 0
    calls: int = 0
    first_cursor: int = 0
    last_cursor: int = 0
    # The server process's CPU time (user + system) over the phase; None where /proc is missing.
    server_cpu: float | None = None

    @property
    def rate(self) -> float:
        return self.reports / self.seconds

    @property
    def cpu_ms_per_1000(self) -> str:
        if self.server_cpu is None:
            return "n/a"
        return f"{self.server_cpu * 1e6 / self.reports:.0f}"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gms_batch(prefix: str, size: int) -> str:
    return json.dumps(
        [
            {
                "number": "380961111111",
                "time": 1_700_000_000_000 + index,
                "status": 2,
                "substatus": 23,
                "hyber_status": 23011,
                "message_id": f"{prefix}-{index}",
                "extra_id": "AD-6640-7006",
                "sent_via": "sms",
            }
            for index in range(size)
        ]
    )


async def run_phase(
    stub: DeliveryReportServiceAsyncStub, phase: Phase, writers: int, batch: int, server_pid: int
) -> None:
    """`writers` clients ingest batches until the phase's time is up; counts what was acknowledged."""
    deadline = time.monotonic() + phase.seconds
    cursors: list[int] = []

    async def write(writer: int) -> None:
        call = 0
        while time.monotonic() < deadline:
            call += 1
            payload = gms_batch(f"{phase.name}-w{writer}-c{call}", batch)
            response = await stub.Ingest(
                IngestRequest(payload=payload, format=Format.FORMAT_GMS), timeout=RPC_TIMEOUT
            )
            assert response.accepted_count == batch, response
            phase.reports += batch
            phase.calls += 1
            cursors.extend(int(result.cursor) for result in response.results)

    started, cpu_before = time.monotonic(), cpu_seconds(server_pid)
    await asyncio.gather(*(write(writer) for writer in range(writers)))
    phase.seconds = time.monotonic() - started  # the last calls end a little after the deadline
    cpu_after = cpu_seconds(server_pid)
    if cpu_before is not None and cpu_after is not None:
        phase.server_cpu = cpu_after - cpu_before
    phase.first_cursor, phase.last_cursor = min(cursors), max(cursors)


async def bench(options: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="dlrhub-bench-") as directory,
        launcher.start(Path(directory) / "bench.db", keep=200) as server,
    ):
        ratios = [
            await measure(server.address, server.pid, options, run) for run in range(1, options.repeat + 1)
        ]
        if len(ratios) > 1:
            print(f"stalled / baseline ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
            print(f"median ratio: {statistics.median(ratios):.3f}  (target: at least 0.90)")


async def measure(address: str, server_pid: int, options: argparse.Namespace, run: int) -> float:
    consumer_options = [("grpc.http2.bdp_probe", 0)] if options.no_bdp else []
    async with (
        grpc.aio.insecure_channel(address) as channel,
        grpc.aio.insecure_channel(address, options=consumer_options) as consumer_channel,
    ):
        stub: DeliveryReportServiceAsyncStub = DeliveryReportServiceStub(channel)
        consumer: DeliveryReportServiceAsyncStub = DeliveryReportServiceStub(consumer_channel)
        if run == 1:
            await run_phase(stub, Phase("warm-up", 1.0), options.writers, options.batch, server_pid)

        before = Phase(f"baseline-{run}a", options.seconds / 2)
        await run_phase(stub, before, options.writers, options.batch, server_pid)

        stall = Phase(f"stalled-{run}", options.stall_seconds)
        stream = consumer.Stream(
            StreamRequest(heartbeat_interval=Duration(seconds=1)), timeout=options.stall_seconds + 600
        )
        responses = stream.__aiter__()
        start = await asyncio.wait_for(anext(responses), RPC_TIMEOUT)
        assert start.HasField("heartbeat")
        await run_phase(stub, stall, options.writers, options.batch, server_pid)

        # The consumer reads again: every change of the stalled phase, in order, once.
        drain_started = time.monotonic()
        cursors: list[int] = []
        while not cursors or cursors[-1] < stall.last_cursor:
            response = await asyncio.wait_for(anext(responses), RPC_TIMEOUT)
            if not response.HasField("heartbeat"):
                cursors.append(int(response.cursor))
        drained = time.monotonic() - drain_started
        stream.cancel()
        expected = list(range(int(start.cursor) + 1, stall.last_cursor + 1))
        complete = cursors == expected

        after = Phase(f"baseline-{run}b", options.seconds / 2)
        await run_phase(stub, after, options.writers, options.batch, server_pid)

    baseline = (before.reports + after.reports) / (before.seconds + after.seconds)
    print(
        f"run {run}/{options.repeat}: {options.writers} writers x {options.batch} reports per Ingest; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; consumer BDP probing "
        f"{'off' if options.no_bdp else 'on'}"
    )
    for phase in (before, stall, after):
        print(
            f"  {phase.name:<11} {phase.seconds:6.1f} s  {phase.reports:7d} reports  {phase.calls:6d} calls"
            f"  {phase.rate:8.0f} reports/s  server CPU {phase.cpu_ms_per_1000} ms per 1000 reports"
        )
    print(f"  baseline (both phases)      {baseline:8.0f} reports/s")
    print(f"  stalled / baseline ratio    {stall.rate / baseline:8.3f}  (target: at least 0.90)")
    if stall.server_cpu is not None and before.server_cpu is not None and after.server_cpu is not None:
        base_cpu = (before.server_cpu + after.server_cpu) / (before.reports + after.reports)
        print(
            f"  server CPU per report, stalled / baseline  {stall.server_cpu / stall.reports / base_cpu:.3f}"
            "  (less sensitive to other load on the machine than throughput)"
        )
    print(
        f"  stalled consumer, reading again: {len(cursors)} changes in {drained:.2f} s;"
        f" every change of the stall, in order, once: {'yes' if complete else 'NO'}"
    )
    if not complete:
        raise SystemExit(1)
    return stall.rate / baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="baseline seconds in all, half before and half after"
    )
    parser.add_argument(
        "--stall-seconds", type=float, default=10.0, help="seconds the consumer reads nothing (the issue: 30)"
    )
    parser.add_argument("--writers", type=int, default=8, help="concurrent Ingest clients")
    parser.add_argument("--batch", type=int, default=10, help="reports per Ingest call")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the three phases; prints the median")
    parser.add_argument("--no-bdp", action="store_true", help="no BDP probing on the consumer's channel")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
