"""Server CPU per call, for comparing two versions of a change (A/B).

    python -m bench.cpu_per_call [--rounds 3] [--calls 6000] [--kinds ingest,fetch]

Starts `dlrhub serve` on a fresh database with 5,000 reports, then drives unary Ingest (one fresh
report per call) and Fetch by message id from two load processes, 16 calls in flight each, and
prints the server's CPU time (all its threads, from /proc) per call for each round. CPU per call
moves less with the machine's noise than throughput ratios do (rounds mostly within ±5-10%, with an
odd outlier), so alternating before/after runs on a quiet machine show changes of ~10% that
`python -m bench` cannot. The server is started as `python -m bench` starts it (DLRHUB_* variables
you set apply, so keep them the same for both sides).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.__main__ import start_dlrhub
from bench.common import FETCH, INGEST, gms_batch, gms_report, proc_cpu_seconds
from deliveryreport.v1.delivery_report_service_pb2 import FetchRequest, IngestRequest

STORED = 5000
IN_FLIGHT = 16


def _load(port: int, kind: str, calls: int, seed: int) -> None:
    """`calls` unary calls of `kind`, IN_FLIGHT at a time (run in a load process)."""

    async def run() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_unary(FETCH if kind == "fetch" else INGEST, None, None)
            numbers = iter(range(calls))

            async def worker() -> None:
                for number in numbers:
                    if kind == "fetch":
                        stored = f"stored-{(number * 7919 + seed) % STORED}"
                        body = FetchRequest(message_id=stored).SerializeToString()
                    else:
                        fresh = f"new-{seed}-{number}-{time.time_ns()}"
                        body = IngestRequest(payload=gms_report(fresh, number)).SerializeToString()
                    await method(body)

            await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))

    asyncio.run(run())


def _load_star(job: tuple[int, str, int, int]) -> None:
    _load(*job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=6000, help="calls per round, over two processes")
    parser.add_argument("--kinds", default="ingest,fetch")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        # As `python -m bench` starts it: real settings, its log drained, DLRHUB_* variables applied.
        server = start_dlrhub(Path(folder) / "cpu.db", "asyncio")
        try:
            with grpc.insecure_channel(server.target) as channel:
                ingest = channel.unary_unary(INGEST, None, None)
                for first in range(0, STORED, 100):
                    ids = [f"stored-{number}" for number in range(first, first + 100)]
                    ingest(IngestRequest(payload=gms_batch(ids, first)).SerializeToString(), timeout=30)
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                pool.map(_load_star, [(server.port, "fetch", 500, 1), (server.port, "ingest", 500, 2)])
                for kind in options.kinds.split(","):
                    figures = []
                    for round_ in range(options.rounds):
                        time.sleep(0.5)  # the last round's queued log lines are written (CallLog)
                        if server.process.poll() is not None:
                            raise RuntimeError("dlrhub exited:\n" + "".join(server.lines[-20:]))
                        cpu, started = proc_cpu_seconds(server.pid), time.perf_counter()
                        half = options.calls // 2
                        jobs = [(server.port, kind, half, 2 * round_ + k) for k in range(2)]
                        pool.map(_load_star, jobs)
                        seconds = time.perf_counter() - started
                        used = proc_cpu_seconds(server.pid) - cpu
                        figures.append(f"{used / (2 * half) * 1e6:.0f} µs ({2 * half / seconds:,.0f}/s)")
                    print(f"{kind:7} server CPU per call: {', '.join(figures)}", flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
