"""Server CPU per call, for comparing two versions of a change (A/B).

    python -m bench.cpu_per_call [--rounds 3] [--calls 6000] [--kinds echo,ingest,fetch]
    python -m bench.cpu_per_call --kinds http_echo,webhook

Starts `dlrhub serve` on a fresh database with 5,000 reports, then drives unary Ingest (one fresh
report per call) and Fetch by message id from two load processes, 16 calls in flight each
(`--in-flight`), and prints the server's CPU time (all its threads, from /proc) per call for each
round. The `echo` kind drives the echo server (`bench.echo_server`, the ceiling of `python -m bench`)
the same way with a Fetch request's bytes: the floor of what any unary call costs on this gRPC stack,
measured in the same run, to which the other kinds are compared (median over median). The `webhook`
kind POSTs one fresh GMS report per call to dlrhub's /webhooks/gms on keep-alive connections, and
`http_echo` the same bodies to the echo's do-nothing aiohttp handler (the webhook phase's ceiling),
to which `webhook` is compared. For `ingest` and `webhook` each round also prints dlrhub's group
commits (from its /metrics): how many reports each held and how long each took. CPU per call
moves less with the machine's noise than throughput ratios do (rounds mostly within ±5-10%, with an
odd outlier), so alternating before/after runs on a quiet machine show changes of ~10% that
`python -m bench` cannot; `--against DIR` runs a second dlrhub from another version's server/ (made
with `git archive`) in the same run, its rounds paired with this one's, and prints the ratio of each
pair. The servers are started as `python -m bench` starts them (DLRHUB_* variables you set apply,
so keep them the same for both sides).
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
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench.common import ECHO_UNARY, FETCH, INGEST, gms_batch, gms_report, proc_cpu_seconds
from bench.servers import Server, start_dlrhub, start_echo
from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, IngestRequest

STORED = 5000
IN_FLIGHT = 16  # per load process (two)
KINDS = ("echo", "ingest", "fetch", "http_echo", "webhook")
HTTP_KINDS = ("http_echo", "webhook")
# What each kind is compared to: the ceiling of its stack, measured in the same run.
BASELINE = {"ingest": "echo", "fetch": "echo", "webhook": "http_echo"}


def _load(port: int, kind: str, calls: int, seed: int, in_flight: int = IN_FLIGHT) -> None:
    """`calls` unary calls of `kind`, `in_flight` at a time (run in a load process)."""

    async def run() -> None:
        if kind in HTTP_KINDS:
            await _post(port, calls, seed, in_flight)
            return
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

            await asyncio.gather(*(worker() for _ in range(in_flight)))

    asyncio.run(run())


async def _post(port: int, calls: int, seed: int, in_flight: int) -> None:
    """`calls` POSTs of one fresh GMS report to /webhooks/gms, `in_flight` at a time."""
    url = f"http://127.0.0.1:{port}/webhooks/gms"
    numbers = iter(range(calls))
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

        async def worker() -> None:
            for number in numbers:
                body = gms_report(f"hook-{seed}-{number}-{time.time_ns()}", number).encode()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"POST answered {response.status}")

        await asyncio.gather(*(worker() for _ in range(in_flight)))


def _load_star(job: tuple[int, str, int, int, int]) -> None:
    _load(*job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=6000, help="calls per round, over two processes")
    parser.add_argument("--kinds", default="echo,ingest,fetch")
    parser.add_argument(
        "--in-flight", type=int, default=IN_FLIGHT, help="calls in flight per load process (two)"
    )
    parser.add_argument(
        "--against",
        metavar="SERVER_DIR",
        help="also run a second dlrhub from this copy of server/ (another version: `git archive`),"
        " its rounds paired with this one's, and print the ratios pair by pair",
    )
    options = parser.parse_args(argv)
    kinds = sorted(options.kinds.split(","), key=lambda kind: kind in BASELINE)  # the baselines first
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}: choose from {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as servers:
        # As `python -m bench` starts it: real settings, its log drained, DLRHUB_* variables applied.
        hubs = {"": _start(servers, Path(folder) / "cpu.db")}
        if options.against:
            hubs["against"] = _start(servers, Path(folder) / "against.db", options.against)
        echo = start_echo("asyncio") if {"echo", "http_echo"} & set(kinds) else None
        if echo is not None:
            servers.callback(echo.stop)
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            warm_up = [job for hub in hubs.values() for job in _warm_up(hub)]
            if echo is not None:
                warm_up += [
                    (echo.port, "echo", 500, 3, IN_FLIGHT),
                    (echo.http_port, "http_echo", 500, 4, IN_FLIGHT),
                ]
            pool.map(_load_star, warm_up)
            medians: dict[str, float] = {}
            for kind in kinds:
                targets = {"": echo} if kind in ("echo", "http_echo") and echo is not None else hubs
                rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
                for round_ in range(options.rounds):
                    # Paired rounds, in turn first and second, so a drift of the machine is shared.
                    for name in sorted(targets, reverse=round_ % 2 == 1):
                        rounds[name].append(_round(pool, targets[name], kind, options, round_))
                for name, measured in rounds.items():
                    label = f"{kind} ({name})" if name else kind
                    medians[label] = statistics.median(us for us, _ in measured)
                    figures = ", ".join(f"{us:.0f} µs ({rate:,.0f}/s)" for us, rate in measured)
                    compared = ""
                    baseline = BASELINE.get(kind)
                    if baseline in medians:
                        compared = f"; median {medians[label] / medians[baseline]:.2f}x {baseline}"
                    print(f"{label:7} server CPU per call: {figures}{compared}", flush=True)
                if len(rounds) == 2:
                    pairs = [b / a for (a, _), (b, _) in zip(rounds[""], rounds["against"], strict=True)]
                    listed = ", ".join(f"{ratio:.2f}" for ratio in pairs)
                    median = statistics.median(pairs)
                    print(f"{kind:7} against / this, pair by pair: {listed}; median {median:.2f}", flush=True)
    return 0


def _start(servers: contextlib.ExitStack, db: Path, pythonpath: str | None = None) -> Server:
    """dlrhub serve (from `pythonpath`'s dlrhub package, if given), with STORED reports stored."""
    server = start_dlrhub(db, "asyncio", pythonpath=pythonpath)
    servers.callback(server.stop)
    with grpc.insecure_channel(server.address) as channel:
        ingest = channel.unary_unary(INGEST, None, None)
        for first in range(0, STORED, 100):
            ids = [f"stored-{number}" for number in range(first, first + 100)]
            ingest(IngestRequest(payload=gms_batch(ids, first)).SerializeToString(), timeout=30)
    return server


def _warm_up(server: Server) -> list[tuple[int, str, int, int, int]]:
    kinds = [(server.port, "fetch"), (server.port, "ingest"), (server.http_port, "webhook")]
    return [(port, kind, 500, seed, IN_FLIGHT) for seed, (port, kind) in enumerate(kinds)]


def _round(
    pool: Any, target: Server, kind: str, options: argparse.Namespace, round_: int
) -> tuple[float, float]:
    """One round of `options.calls` calls of `kind` to `target`: its CPU per call (µs), calls/s."""
    time.sleep(0.5)  # the last round's queued log lines are written (CallLog)
    _check_running(target)
    port = target.http_port if kind in HTTP_KINDS else target.port
    commits = _commits(target)
    cpu, started = proc_cpu_seconds(target.pid), time.perf_counter()
    half = options.calls // 2
    pool.map(_load_star, [(port, kind, half, 2 * round_ + k, options.in_flight) for k in range(2)])
    seconds = time.perf_counter() - started
    per_call = (proc_cpu_seconds(target.pid) - cpu) / (2 * half) * 1e6
    if commits is not None and kind in ("ingest", "webhook"):
        (groups, reports, commit_seconds) = (
            b - a for a, b in zip(commits, _commits(target) or commits, strict=True)
        )
        if groups:
            print(
                f"  {kind}: {groups:.0f} group commits, {reports / groups:.1f} reports and"
                f" {commit_seconds / groups * 1000:.2f} ms each (on the writer thread, fsync included)",
                flush=True,
            )
    return per_call, 2 * half / seconds


def _commits(server: Server) -> tuple[float, float, float] | None:
    """dlrhub's group commits so far, from its /metrics: how many, their reports and their seconds."""
    if not server.admin_port:
        return None
    with urllib.request.urlopen(f"http://{server.admin_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    figures = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("dlrhub_store_commit_")
    )
    return (
        float(figures["dlrhub_store_commit_reports_count"]),
        float(figures["dlrhub_store_commit_reports_sum"]),
        float(figures["dlrhub_store_commit_seconds_sum"]),
    )


def _check_running(server: Server) -> None:
    if server.process.poll() is not None:
        raise RuntimeError(f"{server.name} exited:\n" + "".join(server.output.lines()[-20:]))


if __name__ == "__main__":
    sys.exit(main())
