"""Server CPU per call, for comparing two versions of a change (A/B).

    python -m bench.cpu_per_call [--rounds 3] [--calls 6000] [--kinds echo,ingest,fetch]

Starts `dlrhub serve` on a fresh database with 5,000 reports, then drives unary Ingest (one fresh
report per call) and Fetch by message id from two load processes, 16 calls in flight each, and
prints the server's CPU time (all its threads, from /proc) per call for each round. The `echo` kind
drives the echo server (`bench.echo_server`, the ceiling of `python -m bench`) the same way with a
Fetch request's bytes: the floor of what any unary call costs on this gRPC stack, measured in the
same run, to which the other kinds are compared (median over median). CPU per call
moves less with the machine's noise than throughput ratios do (rounds mostly within ±5-10%, with an
odd outlier), so alternating before/after runs on a quiet machine show changes of ~10% that
`python -m bench` cannot. The server is started as `python -m bench` starts it (DLRHUB_* variables
you set apply, so keep them the same for both sides).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import ECHO_UNARY, FETCH, INGEST, gms_batch, gms_report, proc_cpu_seconds
from bench.servers import Server, start_dlrhub, start_echo
from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, IngestRequest

STORED = 5000
IN_FLIGHT = 16


def _load(port: int, kind: str, calls: int, seed: int) -> None:
    """`calls` unary calls of `kind`, IN_FLIGHT at a time (run in a load process)."""

    async def run() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            path = {"echo": ECHO_UNARY, "fetch": FETCH, "ingest": INGEST}[kind]
            method = channel.unary_unary(path, None, None)
            numbers = iter(range(calls))

            async def worker() -> None:
                for number in numbers:
                    if kind in ("echo", "fetch"):
                        stored = f"stored-{(number * 7919 + seed) % STORED}"
                        body = GetMessageRequest(message_id=stored).SerializeToString()
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
    parser.add_argument("--kinds", default="echo,ingest,fetch")
    options = parser.parse_args(argv)
    kinds = sorted(options.kinds.split(","), key=lambda kind: kind != "echo")  # the baseline first
    unknown = set(kinds) - {"echo", "ingest", "fetch"}
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}: choose from echo, ingest, fetch")
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as servers:
        # As `python -m bench` starts it: real settings, its log drained, DLRHUB_* variables applied.
        server = start_dlrhub(Path(folder) / "cpu.db", "asyncio")
        servers.callback(server.stop)
        echo = start_echo("asyncio") if "echo" in kinds else None
        if echo is not None:
            servers.callback(echo.stop)
        with grpc.insecure_channel(server.address) as channel:
            ingest = channel.unary_unary(INGEST, None, None)
            for first in range(0, STORED, 100):
                ids = [f"stored-{number}" for number in range(first, first + 100)]
                ingest(IngestRequest(payload=gms_batch(ids, first)).SerializeToString(), timeout=30)
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            warm_up = [(server.port, "fetch", 500, 1), (server.port, "ingest", 500, 2)]
            if echo is not None:
                warm_up.append((echo.port, "echo", 500, 3))
            pool.map(_load_star, warm_up)
            medians: dict[str, float] = {}
            for kind in kinds:
                target = echo if kind == "echo" and echo is not None else server
                figures, per_call = [], []
                for round_ in range(options.rounds):
                    time.sleep(0.5)  # the last round's queued log lines are written (CallLog)
                    _check_running(target)
                    cpu, started = proc_cpu_seconds(target.pid), time.perf_counter()
                    half = options.calls // 2
                    jobs = [(target.port, kind, half, 2 * round_ + k) for k in range(2)]
                    pool.map(_load_star, jobs)
                    seconds = time.perf_counter() - started
                    per_call.append((proc_cpu_seconds(target.pid) - cpu) / (2 * half) * 1e6)
                    figures.append(f"{per_call[-1]:.0f} µs ({2 * half / seconds:,.0f}/s)")
                medians[kind] = statistics.median(per_call)
                compared = ""
                if kind != "echo" and "echo" in medians:
                    compared = f"; median {medians[kind] / medians['echo']:.2f}x echo"
                print(f"{kind:7} server CPU per call: {', '.join(figures)}{compared}", flush=True)
    return 0


def _check_running(server: Server) -> None:
    if server.process.poll() is not None:
        raise RuntimeError(f"{server.name} exited:\n" + "".join(server.output.lines()[-20:]))


if __name__ == "__main__":
    sys.exit(main())
