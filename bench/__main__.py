"""dlrhub end-to-end benchmark against an echo ceiling on the same gRPC stack, in one run.

    python -m bench [--quick | --full] [--event-loop asyncio|uvloop|both] [--profile]

Starts `dlrhub serve` (its real settings: WAL, synchronous=FULL, group commit; only the addresses
and the database file are set) and bench/echo_server.py (a grpc.aio server with dlrhub's own
server options and identity serializers), drives both from separate load processes
(bench/load.py), and measures, with the echo figure of the same run as the ceiling:

  unary Ingest (one report per call)       vs unary echo of the same bytes, at several concurrencies
  batched Ingest (100 reports per call)    vs client-streaming echo, in reports (messages) per second
  Fetch by message id, 10k (and 1M) stored vs unary echo of the same request bytes
  Stream fan-out, 1 and 10 subscribers     vs bare server-streaming fan-out of same-size messages
  Ingest-ack -> subscriber latency         at half of the peak unary Ingest rate, 1 and 10 subscribers
  server RSS                               with 10k (and 1M) reports stored, after the Fetch load

It prints a table (measure, value, ceiling, ratio, target, pass/fail), writes the figures to
bench/results/<timestamp>.json and a plot to bench/results/<timestamp>.png. With --profile, every
phase that misses a target is run again with py-spy attached to the server, and its hotspots are
printed and saved beside the results. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import multiprocessing.process
import os
import platform
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from bench import load, preload, profiling
from bench.common import (
    CACHE,
    ECHO_CLIENT_STREAM,
    ECHO_SERVER_STREAM,
    ECHO_UNARY,
    FETCH,
    INGEST,
    RESULTS,
    ROOT,
    SERVICE,
    STREAM,
    STREAM_BATCHES,
    gms_report,
    live_id,
    proc_cpu_seconds,
    proc_read_bytes,
    proc_status,
    summarise_us,
    warm_page_cache,
)
from deliveryreport.v1.delivery_report_service_pb2 import Format, StreamResponse
from dlrhub.merge import merge
from dlrhub.normalise import Normaliser

Job = dict[str, Any]
Point = dict[str, Any]

# Environment variables the load processes cannot follow (they speak plaintext, without a token):
# dropped from the server's environment. Every other DLRHUB_* setting the caller has set applies.
_UNSUPPORTED_ENV = ("DLRHUB_TOKENS", "DLRHUB_TOKENS_FILE", "DLRHUB_TLS_CERT", "DLRHUB_TLS_KEY")


@dataclass(frozen=True)
class Mode:
    name: str
    warmup: float  # seconds of load before each measurement window
    duration: float  # seconds of each measurement window
    unary_levels: tuple[int, ...]  # calls in flight, unary Ingest vs echo
    fetch_levels: tuple[int, ...]  # calls in flight, Fetch vs echo
    million: bool  # also the 1M-report database (Fetch, RSS)
    latency_fractions: tuple[float, ...] = (0.5,)  # ack->subscriber latency at these shares of peak
    fanout_steps: int = 5  # points in the search for the sustainable fan-out rate


MODES = {
    "quick": Mode("quick", 1.0, 3.0, (8, 32, 64), (32,), million=False),
    "standard": Mode("standard", 2.0, 5.0, (8, 32, 64), (8, 32), million=False),
    "full": Mode(
        "full", 2.0, 8.0, (4, 8, 16, 32, 64, 128), (8, 32, 64), million=True, latency_fractions=(0.25, 0.5)
    ),
}


PHASES = frozenset({"unary", "batched", "fanout", "latency", "fetch"})


@dataclass
class Options:
    mode: Mode
    loops: list[str]
    procs: int  # load processes for Ingest / Fetch / echo
    subscribers: int  # the larger fan-out
    batch: int  # reports per batched Ingest
    batch_inflight: int  # batched Ingest calls in flight (all processes)
    stream_messages: int  # messages per client-streaming echo call
    million: int  # reports in the "1M" database
    profile: bool
    keep: bool
    patience: float  # seconds to wait for a quiet machine before each point
    warm: bool = True  # read the database file into the page cache before each Fetch point
    subscriber_client: str = "node"  # "node" (bench/subscriber.js) or "python" (bench/load.py)
    stream_method: str = STREAM_BATCHES  # what dlrhub's subscribers follow: StreamBatches or Stream
    only: frozenset[str] = PHASES  # the phases to run (latency needs unary: its rate is half of unary's peak)


# Servers.


class Server:
    """A server subprocess: dlrhub or the echo server."""

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        ready: Callable[[dict[str, Any]], bool],
        poll: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.name = name
        env = {key: value for key, value in os.environ.items() if key not in _UNSUPPORTED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.info = self._wait_ready(ready, poll)
        self.port = int(self.info["port"])
        self.target = f"127.0.0.1:{self.port}"
        self.pid = self.process.pid
        self.uvloop = _maps_contain(self.pid, "uvloop/loop.")
        self.http_port = 0  # dlrhub's webhooks and /metrics

    def _wait_ready(
        self, ready: Callable[[dict[str, Any]], bool], poll: Callable[[], dict[str, Any] | None] | None
    ) -> dict[str, Any]:
        found: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert self.process.stdout is not None
        assert self.process.stderr is not None

        def drain(stream: Any) -> None:
            waiting = True
            for line in stream:
                self.lines.append(line)
                if len(self.lines) > 400:
                    del self.lines[:-200]
                if waiting:  # after that, the lines (dlrhub logs every call) are only kept
                    with contextlib.suppress(json.JSONDecodeError):
                        entry = json.loads(line)
                        if isinstance(entry, dict) and ready(entry):
                            found.put(entry)
                            waiting = False
            found.put(None)

        for stream in (self.process.stdout, self.process.stderr):
            threading.Thread(target=drain, args=(stream,), daemon=True).start()
        deadline = time.monotonic() + 60
        ended = 0
        while time.monotonic() < deadline:
            try:
                entry = found.get(timeout=0.5)
            except queue.Empty:
                entry = poll() if poll is not None and self.process.poll() is None else None
                if entry is not None:
                    return entry
                continue
            if entry is not None:
                return entry
            ended += 1
            if ended == 2:
                break
        self.process.kill()
        raise RuntimeError(f"{self.name} did not start:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _maps_contain(pid: int, needle: str) -> bool:
    """Whether the process has a shared object whose path contains `needle` mapped (e.g. uvloop's)."""
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _health_ready(port: int) -> Callable[[], dict[str, Any] | None]:
    """Readiness by the health service, for when the "serving" line is not logged (a log level
    above INFO)."""

    def check() -> dict[str, Any] | None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                answer = channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=HealthCheckRequest.SerializeToString,
                    response_deserializer=HealthCheckResponse.FromString,
                )(HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return None
        return {"port": port} if answer.status == HealthCheckResponse.SERVING else None

    return check


def start_dlrhub(db: Path, event_loop: str) -> Server:
    launcher = ["-m", "bench.serve_uvloop"] if event_loop == "uvloop" else ["-m", "dlrhub.cli"]
    port, http_port = _free_port(), _free_port()
    command = [
        sys.executable,
        *launcher,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--db",
        str(db),
    ]
    server = Server(
        "dlrhub",
        command,
        ready=lambda entry: entry.get("message") == "serving",
        poll=_health_ready(port),
    )
    server.http_port = http_port
    if server.uvloop != (event_loop == "uvloop"):
        server.stop()
        raise RuntimeError(f"dlrhub was to run on {event_loop}, but uvloop loaded: {server.uvloop}")
    return server


def start_echo(event_loop: str) -> Server:
    command = [sys.executable, "-m", "bench.echo_server", "--event-loop", event_loop]
    return Server("echo", command, ready=lambda entry: "port" in entry)


# Load processes.


class Pool:
    """Load processes started once (spawn), each running one job per measurement point."""

    def __init__(self, loaders: int, subscribers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._results: Any = context.Queue()
        self._queues: list[Any] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for index in range(loaders + subscribers):
            jobs: Any = context.Queue()
            process = context.Process(
                target=load.worker_main, args=(index, jobs, self._results), name=f"bench-load-{index}"
            )
            process.daemon = True
            process.start()
            self._queues.append(jobs)
            self._processes.append(process)
        self.loaders = list(range(loaders))
        self.subscribers = list(range(loaders, loaders + subscribers))
        ids = [self.submit(index, {"kind": "ping"}) for index in range(len(self._queues))]
        self.collect(ids, timeout=120)

    def submit(self, worker: int, job: Job) -> str:
        job_id = uuid.uuid4().hex
        self._queues[worker].put({**job, "job_id": job_id, "worker_index": worker})
        return job_id

    def collect(self, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
        wanted = set(job_ids)
        results: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"load processes did not answer in {timeout:.0f} s")
            try:
                result = self._results.get(timeout=remaining)
            except queue.Empty:
                continue
            if result.get("job_id") in wanted:
                wanted.discard(result["job_id"])
                if "failed" in result:
                    raise RuntimeError(f"load process {result['worker']} failed:\n{result['failed']}")
                results.append(result)
        return results

    def close(self) -> None:
        for jobs in self._queues:
            jobs.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle or iowait), from /proc/stat."""
    fields = [float(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_pct: float = 25.0, patience: float = 120.0) -> float:
    """Waits (up to `patience` s) until the machine is nearly idle, so that other work (another
    test run) does not share the window; the busy share (% of one core) last seen."""
    deadline = time.monotonic() + patience
    warned = False
    while True:
        before = machine_busy()
        time.sleep(0.5)
        busy = 100 * (machine_busy() - before) / 0.5
        if busy < limit_pct or time.monotonic() > deadline:
            if busy >= limit_pct:
                print(
                    f"  (machine still {busy:.0f}% busy after {patience:.0f} s: measuring anyway)", flush=True
                )
            return busy
        if not warned:
            print(f"  (machine {busy:.0f}% busy with other work: waiting for it to settle)", flush=True)
            warned = True
        time.sleep(1.0)


def split(total: int, parts: int) -> list[int]:
    """`total` spread over at most `parts` processes (no process gets 0)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


# The suite.


@dataclass
class Suite:
    """Every measurement of one event loop."""

    options: Options
    pool: Pool
    event_loop: str
    workdir: Path
    stamp: str
    points: list[Point] = field(default_factory=list)
    rss: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, Any] = field(default_factory=dict)
    stream_message_bytes: int = 0
    _echo_fetch: dict[int, Point] = field(default_factory=dict)

    @property
    def mode(self) -> Mode:
        return self.options.mode

    # Running one point.

    def measure(
        self,
        server: Server,
        jobs: list[tuple[int, Job]],
        *,
        lead: float = 0.6,
        profile_as: str | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Runs the jobs on a shared window; their results, and the server's CPU in the window."""
        mode = self.mode
        busy_before = wait_quiet(patience=self.options.patience)
        start_at = time.time() + lead + mode.warmup
        tag = uuid.uuid4().hex[:8]
        common = {
            "target": server.target,
            "start_at": start_at,
            "warmup": mode.warmup,
            "duration": mode.duration,
            "tag": tag,
            "subscriber_client": self.options.subscriber_client,
        }
        profiler = None
        if profile_as is not None:
            raw = RESULTS / f"{self.stamp}-profile-{profile_as}-{self.event_loop}.raw"
            profiler = profiling.Profiler(server.pid, mode.warmup + mode.duration + lead, raw)
        ids = [self.pool.submit(worker, {**common, **job}) for worker, job in jobs]
        _sleep_until(start_at)
        cpu0, busy0, read0 = proc_cpu_seconds(server.pid), machine_busy(), proc_read_bytes(server.pid)
        _sleep_until(start_at + mode.duration)
        cpu1, busy1, read1 = proc_cpu_seconds(server.pid), machine_busy(), proc_read_bytes(server.pid)
        results = self.pool.collect(ids, timeout=mode.warmup + mode.duration + lead + 120)
        # CPU in % of one core (the machine has os.cpu_count() of them); "other" is everything
        # that is neither the server nor the load processes (ideally ~0).
        window = {
            "server_cpu_pct": 100 * (cpu1 - cpu0) / mode.duration,
            "client_cpu_pct": 100 * sum(r.get("client_cpu_s", 0.0) for r in results) / mode.duration,
            "machine_busy_pct": 100 * (busy1 - busy0) / mode.duration,
            "busy_before_pct": busy_before,
            # Page-cache misses of the server: > 0 means the figure is (partly) disk-bound.
            "server_disk_read_mb_s": (read1 - read0) / mode.duration / 1e6,
        }
        window["other_cpu_pct"] = (
            window["machine_busy_pct"] - window["server_cpu_pct"] - window["client_cpu_pct"]
        )
        if profiler is not None:
            errors = profiler.wait()
            if not profiler.output.exists():
                print(f"  py-spy failed: {errors.strip()[-500:]}", flush=True)
            else:
                summary = profiling.summarise(profiler.output).as_dict()
                self.profiles[profile_as or ""] = summary
                text = profiling.format_profile(f"{profile_as} ({self.event_loop})", summary)
                profiler.output.with_suffix(".txt").write_text(text + "\n")
                print(text, flush=True)
        return results, window

    def record(self, point: Point) -> Point:
        self.points.append(point)
        return point

    # Unary Ingest vs unary echo.

    def unary_jobs(self, method: str, payload: str, concurrency: int, **extra: Any) -> list[tuple[int, Job]]:
        shares = split(concurrency, self.options.procs)
        return [
            (
                worker,
                {
                    "kind": "unary",
                    "method": method,
                    "payload": payload,
                    "concurrency": share,
                    **extra,
                },
            )
            for worker, share in zip(self.pool.loaders, shares, strict=False)
        ]

    def unary_point(
        self, scenario: str, server: Server, method: str, payload: str, concurrency: int, **extra: Any
    ) -> Point:
        jobs = self.unary_jobs(method, payload, concurrency, **extra)
        results, window = self.measure(server, jobs)
        point = _unary_summary(results, self.mode.duration)
        point.update(window, scenario=scenario, target=server.name, concurrency=concurrency)
        _print_point(point)
        return self.record(point)

    def run_unary(self, echo: Server, hub: Server) -> None:
        print(f"-- unary Ingest vs unary echo ({self.event_loop})", flush=True)
        for concurrency in self.mode.unary_levels:
            self.unary_point("unary", echo, ECHO_UNARY, "ingest", concurrency)
            self.unary_point("unary", hub, INGEST, "ingest", concurrency)

    def batch_jobs(self) -> list[tuple[int, Job]]:
        return self.unary_jobs(INGEST, "batch", self.options.batch_inflight, batch=self.options.batch)

    def run_batched(self, echo: Server, hub: Server) -> None:
        print(f"-- batched Ingest vs client-streaming echo ({self.event_loop})", flush=True)
        streams = split(self.options.batch_inflight, self.options.procs)
        jobs = [
            (
                worker,
                {
                    "kind": "client_stream",
                    "method": ECHO_CLIENT_STREAM,
                    "concurrency": max(1, share // 2),
                    "messages": self.options.stream_messages,
                },
            )
            for worker, share in zip(self.pool.loaders, streams, strict=False)
        ]
        results, window = self.measure(echo, jobs)
        point = _unary_summary(results, self.mode.duration)
        point.update(window, scenario="client_stream", target="echo", concurrency=len(jobs))
        _print_point(point)
        self.record(point)
        results, window = self.measure(hub, self.batch_jobs())
        point = _unary_summary(results, self.mode.duration)
        point.update(
            window,
            scenario="batched",
            target="dlrhub",
            concurrency=self.options.batch_inflight,
            batch=self.options.batch,
        )
        _print_point(point)
        self.record(point)

    # Stream fan-out.

    def run_fanout(self, echo: Server, hub: Server) -> None:
        print(f"-- Stream fan-out ({self.event_loop})", flush=True)
        counts = sorted({1, self.options.subscribers})
        for subscribers in counts:
            jobs = [
                (
                    worker,
                    {
                        "kind": "server_stream",
                        "method": ECHO_SERVER_STREAM,
                        "size": self.stream_message_bytes,
                    },
                )
                for worker in self.pool.subscribers[:subscribers]
            ]
            results, window = self.measure(echo, jobs)
            point = _fanout_summary(results, self.mode.duration)
            point.update(window, scenario="fanout", target="echo", subscribers=subscribers)
            _print_point(point)
            self.record(point)
        runs = [(self.options.stream_method, subscribers) for subscribers in counts]
        if self.options.stream_method == STREAM_BATCHES and self.options.subscribers > 1:
            runs.append((STREAM, self.options.subscribers))  # one change per message, for comparison
        for method, subscribers in runs:
            overload = self.fanout_point(hub, subscribers, None, method)
            best = self.sustainable_fanout(hub, subscribers, overload["per_subscriber_min"], method)
            if best is not None:
                self.record({**best, "scenario": "fanout"})

    def fanout_point(self, hub: Server, subscribers: int, rate: float | None, method: str) -> Point:
        """`subscribers` live subscriptions to `method` (Stream or StreamBatches) while batched Ingest
        runs at `rate` reports/s (None: flat out)."""
        subs = [
            (worker, {"kind": "subscribe", "method": method, "mode": "count"})
            for worker in self.pool.subscribers[:subscribers]
        ]
        loaders = self.batch_jobs()
        if rate is not None:
            calls_per_s = rate / self.options.batch / self.options.procs
            loaders = [(worker, {**job, "rate": calls_per_s}) for worker, job in loaders]
        overflows_before = _stream_overflows(hub)
        results, window = self.measure(hub, subs + loaders, lead=2.0)
        overflows = _stream_overflows(hub) - overflows_before
        point = _fanout_summary([r for r in results if "calls" not in r], self.mode.duration)
        ingest = _unary_summary([r for r in results if "calls" in r], self.mode.duration)["items_per_s"]
        point.update(
            window,
            scenario="fanout_search" if rate is not None else "fanout_overload",
            target="dlrhub",
            rpc=method.rpartition("/")[2],
            subscribers=subscribers,
            ingest_reports_per_s=ingest,
            offered_reports_per_s=rate,
            overflows=overflows,
            # Kept up: no subscriber ever fell a buffer behind (all were served live, none caught up
            # from the store), each received the feed, and Ingest ran at the rate offered.
            kept_up=overflows == 0
            and point["per_subscriber_min"] >= 0.9 * ingest
            and (rate is None or ingest >= 0.97 * rate),
        )
        _print_point(point)
        return self.record(point)

    def sustainable_fanout(self, hub: Server, subscribers: int, start: float, method: str) -> Point | None:
        """The highest paced Ingest rate at which every subscriber keeps up, found in a few steps
        (grow by half until one falls behind, then bisect); that point, or None if none kept up."""
        low: Point | None = None
        high: float | None = None
        rate = max(start, 100.0)
        for _ in range(self.mode.fanout_steps):
            point = self.fanout_point(hub, subscribers, rate, method)
            if point["kept_up"]:
                low = point
                rate = rate * 1.5 if high is None else (rate + high) / 2
            else:
                high = rate
                rate = (low["offered_reports_per_s"] + rate) / 2 if low is not None else rate / 2
        return low

    def latency_jobs(self, rate: float, subscribers: int) -> list[tuple[int, Job]]:
        subs = [
            (
                worker,
                {"kind": "subscribe", "method": self.options.stream_method, "mode": "record", "grace": 3.0},
            )
            for worker in self.pool.subscribers[:subscribers]
        ]
        loaders = self.unary_jobs(
            INGEST, "ingest", 64 * self.options.procs, rate=rate / self.options.procs, record_ids=True
        )
        return subs + loaders

    def run_latency(self, hub: Server, peak: float) -> None:
        for fraction in self.mode.latency_fractions:
            rate = peak * fraction
            print(
                f"-- Ingest ack -> subscriber latency at {fraction:g} x peak = {rate:,.0f} calls/s"
                f" ({self.event_loop})",
                flush=True,
            )
            for subscribers in sorted({1, self.options.subscribers}):
                results, window = self.measure(hub, self.latency_jobs(rate, subscribers), lead=2.0)
                point = _latency_summary(results, self.mode.duration)
                point.update(
                    window,
                    scenario="latency",
                    target="dlrhub",
                    subscribers=subscribers,
                    offered_per_s=rate,
                    fraction=fraction,
                )
                _print_point(point)
                self.record(point)

    # Fetch by message id.

    def run_fetch(self, echo: Server, stored: int, db: Path) -> None:
        print(f"-- Fetch by message id, {stored:,} stored ({self.event_loop})", flush=True)
        hub = start_dlrhub(db, self.event_loop)
        try:
            label = _count_label(stored)
            self.rss[f"idle, {label} stored"] = proc_status(hub.pid)
            for concurrency in self.mode.fetch_levels:
                if concurrency not in self._echo_fetch:
                    self._echo_fetch[concurrency] = self.unary_point(
                        "fetch_echo", echo, ECHO_UNARY, "fetch", concurrency, stored=stored
                    )
                if self.options.warm:
                    # This VM reclaims idle page cache within seconds (DAMON): without this, a big
                    # file is read from disk and the figure measures the disk (see README).
                    warm_page_cache(db)
                self.unary_point(f"fetch_{label}", hub, FETCH, "fetch", concurrency, stored=stored)
            self.rss[f"after Fetch load, {label} stored"] = proc_status(hub.pid)
            self.maybe_profile(
                f"fetch_{label}",
                hub,
                lambda: self.unary_jobs(FETCH, "fetch", max(self.mode.fetch_levels), stored=stored),
            )
        finally:
            hub.stop()

    # Profiling.

    def maybe_profile(self, phase: str, server: Server, jobs: Callable[[], list[tuple[int, Job]]]) -> None:
        """Runs the phase's load again with py-spy on the server, if asked and a target was missed."""
        if not self.options.profile:
            return
        self.rows = build_rows(self)
        missed = [row for row in self.rows if row.get("phase") == phase and row["ok"] is False]
        if not missed:
            return
        print(f"-- profiling {phase} (missed: {', '.join(row['measure'] for row in missed)})", flush=True)
        results, window = self.measure(server, jobs(), lead=1.0, profile_as=phase)
        duration = self.mode.duration
        self.profiles.setdefault("_load", {})[phase] = {
            **window,
            "calls_per_s": sum(r.get("calls", 0) for r in results) / duration,
            "items_per_s": sum(r.get("items", 0) for r in results) / duration,
            "messages_per_s": sum(r.get("messages", 0) for r in results) / duration,
        }

    # Everything.

    def run(self) -> None:
        self.stream_message_bytes = _stream_message_bytes()
        echo = start_echo(self.event_loop)
        print(f"echo server: {echo.target} ({echo.info.get('loop')})", flush=True)
        try:
            db = self.workdir / f"ingest-{self.event_loop}.db"
            hub = start_dlrhub(db, self.event_loop)
            print(f"dlrhub: {hub.target} (uvloop loaded: {hub.uvloop}), db {db}", flush=True)
            try:
                self.run_ingest_and_stream(echo, hub)
                self.rss["after the Ingest and Stream phases"] = {
                    **proc_status(hub.pid),
                    "stored": _stored_count(hub),
                }
            finally:
                hub.stop()
            if "fetch" not in self.options.only:
                return
            small = self.workdir / "fetch-10k.db"
            shutil.copyfile(preload.ensure(10_000), small)
            self.run_fetch(echo, 10_000, small)
            if self.mode.million:
                print(f"-- preparing the {self.options.million:,}-report database (cached)", flush=True)
                self.run_fetch(echo, self.options.million, preload.ensure(self.options.million))
        finally:
            echo.stop()
            self.rows = build_rows(self)

    def run_ingest_and_stream(self, echo: Server, hub: Server) -> None:
        only = self.options.only
        if "unary" in only:
            self.run_unary(echo, hub)
            peak_level = max(
                (p for p in self.points if p["scenario"] == "unary" and p["target"] == "dlrhub"),
                key=lambda p: p["calls_per_s"],
            )
            self.maybe_profile(
                "unary", hub, lambda: self.unary_jobs(INGEST, "ingest", peak_level["concurrency"])
            )
        if "batched" in only:
            self.run_batched(echo, hub)
            self.maybe_profile("batched", hub, self.batch_jobs)
        if "fanout" in only:
            self.run_fanout(echo, hub)
            subs = self.options.subscribers
            self.maybe_profile(
                "fanout",
                hub,
                lambda: (
                    [
                        (worker, {"kind": "subscribe", "method": self.options.stream_method, "mode": "count"})
                        for worker in self.pool.subscribers[:subs]
                    ]
                    + self.batch_jobs()
                ),
            )
        if "latency" in only and "unary" in only:
            peak = peak_level["calls_per_s"]
            self.run_latency(hub, peak)
            self.maybe_profile("latency", hub, lambda: self.latency_jobs(peak / 2, self.options.subscribers))


def _sleep_until(epoch: float) -> None:
    delay = epoch - time.time()
    if delay > 0:
        time.sleep(delay)


def _count_label(count: int) -> str:
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    if count >= 1000 and count % 1000 == 0:
        return f"{count // 1000}k"
    return str(count)


def _stream_overflows(server: Server) -> float:
    """dlrhub_stream_overflows_total of the running dlrhub, from its /metrics."""
    response = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10)
    response.raise_for_status()
    for line in response.text.splitlines():
        if line.startswith("dlrhub_stream_overflows_total "):
            return float(line.split()[1])
    raise RuntimeError("dlrhub_stream_overflows_total is missing from /metrics")


def _stored_count(server: Server) -> int:
    """Reports in the server's store: the latest cursor, from the opening heartbeat of a Stream."""
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream(STREAM, None, None)(b"", timeout=10)
        for message in call:
            response = StreamResponse.FromString(message)
            call.cancel()  # type: ignore[no-untyped-call]
            return int(response.cursor)
    return 0


def _stream_message_bytes() -> int:
    """The size of one dlrhub StreamResponse for a benchmark report (the echo fan-out sends these)."""
    normaliser = Normaliser.load()
    received = Timestamp()
    received.GetCurrentTime()
    text = gms_report(live_id("00000000", 0, 0), 0)
    (item,) = normaliser.normalise(text, Format.FORMAT_UNSPECIFIED, received)
    assert item.report is not None
    state = merge(None, item.report).state.report
    return StreamResponse(cursor="1000000", report=item.report, state=state).ByteSize()


# Summaries of load results.


def _unary_summary(results: list[dict[str, Any]], duration: float) -> Point:
    latencies = [value for result in results for value in result.get("latencies_us", [])]
    errors: dict[str, int] = {}
    for result in results:
        for code, count in result.get("errors", {}).items():
            errors[code] = errors.get(code, 0) + count
    calls = sum(result.get("calls", 0) for result in results)
    items = sum(result.get("items", 0) for result in results)
    return {
        "calls_per_s": calls / duration,
        "items_per_s": items / duration,
        **summarise_us(latencies),
        "errors": errors,
        "not_accepted": sum(result.get("not_accepted", 0) for result in results),
        "processes": len(results),
    }


def _fanout_summary(results: list[dict[str, Any]], duration: float) -> Point:
    rates = [result["messages"] / duration for result in results]
    return {
        "messages_per_s": sum(rates),
        "per_subscriber_min": min(rates, default=0.0),
        "per_subscriber_max": max(rates, default=0.0),
        "errors": {code: n for r in results for code, n in r.get("errors", {}).items()},
        "late_subscribers": sum(1 for r in results if r.get("late")),
    }


def _latency_summary(results: list[dict[str, Any]], duration: float) -> Point:
    loaders = [r for r in results if "calls" in r]
    subscribers = [r for r in results if "calls" not in r]
    acks = {mid: (sent, done) for r in loaders for mid, sent, done in r["records"]}
    ack_to_sub: list[float] = []
    send_to_sub: list[float] = []
    for r in subscribers:
        for mid, received in r["records"]:
            times = acks.get(mid)
            if times is not None:
                ack_to_sub.append((received - times[1]) / 1000)
                send_to_sub.append((received - times[0]) / 1000)
    expected = len(acks) * len(subscribers)
    ingest = _unary_summary(loaders, duration)
    return {
        "ingest_calls_per_s": ingest["calls_per_s"],
        "ingest_p50_ms": ingest["p50_ms"],
        "ingest_p99_ms": ingest["p99_ms"],
        "ingest_errors": ingest["errors"],
        "max_schedule_lag_ms": max((r.get("late_ns", 0) for r in loaders), default=0) / 1e6,
        "ack_to_subscriber": summarise_us(ack_to_sub),
        "send_to_subscriber": summarise_us(send_to_sub),
        "delivered": len(ack_to_sub),
        "missing": expected - len(ack_to_sub),
    }


def _print_point(point: Point) -> None:
    scenario, target = point["scenario"], point["target"]
    cpu = (
        f"server {point['server_cpu_pct']:.0f}% cpu, clients {point['client_cpu_pct']:.0f}%,"
        f" other {point['other_cpu_pct']:.0f}% (of {100 * (os.cpu_count() or 1)}%)"
    )
    if scenario.startswith("fanout"):
        extra = ""
        if target == "dlrhub":
            offered = point.get("offered_reports_per_s")
            pace = f"of {offered:,.0f} offered" if offered else "flat out"
            overflows = point.get("overflows", 0)
            ingest = point["ingest_reports_per_s"]
            if point.get("kept_up"):
                verdict = "every subscriber kept up"
            elif overflows == 0 and point["per_subscriber_min"] >= 0.9 * ingest:
                verdict = "the subscribers kept up, but Ingest fell short of the rate offered"
            else:
                verdict = f"subscribers fell behind ({overflows:.0f} buffer overflows)"
            extra = f", ingest {point['ingest_reports_per_s']:,.0f} reports/s {pace}: {verdict}"
        label: str = {"fanout_search": "fanout paced", "fanout_overload": "fanout"}.get(scenario) or scenario
        if point.get("rpc") == "Stream":
            label += " (Stream)"
        print(
            f"  {target:6} {label:13} subs={point['subscribers']:<3} "
            f"{point['messages_per_s']:>9,.0f} msgs/s (per sub {point['per_subscriber_min']:,.0f}"
            f"..{point['per_subscriber_max']:,.0f}){extra}; {cpu}",
            flush=True,
        )
    elif scenario == "latency":
        ack = point["ack_to_subscriber"]
        print(
            f"  {target:6} {scenario:13} subs={point['subscribers']:<3} "
            f"ingest {point['ingest_calls_per_s']:,.0f}/s of {point['offered_per_s']:,.0f} offered; "
            f"ack->sub p50 {ack['p50_ms']:.2f} ms p99 {ack['p99_ms']:.2f} ms; "
            f"missing {point['missing']}; {cpu}",
            flush=True,
        )
    else:
        errors = f" errors={point['errors']}" if point["errors"] else ""
        if point.get("server_disk_read_mb_s", 0) >= 0.1:
            errors += f"; server read {point['server_disk_read_mb_s']:.1f} MB/s from disk"
        rejected = f" not-accepted={point['not_accepted']}" if point["not_accepted"] else ""
        print(
            f"  {target:6} {scenario:13} c={point['concurrency']:<4} {point['calls_per_s']:>9,.0f} calls/s"
            f" {point['items_per_s']:>9,.0f} items/s  p50 {point['p50_ms']:6.2f} ms"
            f" p99 {point['p99_ms']:6.2f} ms; {cpu}{errors}{rejected}",
            flush=True,
        )


# The table.


class _Rows:
    """The table's rows, built from the points of a suite."""

    def __init__(self, points: list[Point]) -> None:
        self.points = points
        self.rows: list[dict[str, Any]] = []

    def find(self, scenario: str, target: str, **keys: Any) -> Point | None:
        for point in self.points:
            if (
                point["scenario"] == scenario
                and point["target"] == target
                and all(point.get(key) == value for key, value in keys.items())
            ):
                return point
        return None

    def add(
        self,
        phase: str,
        measure: str,
        value: float,
        unit: str,
        ceiling: float | None = None,
        target: str = "",
        check: Callable[[float], bool] | None = None,
        *,
        on_value: bool = False,
    ) -> None:
        ratio = value / ceiling if ceiling else math.nan
        subject = value if on_value else ratio
        ok = None if check is None or math.isnan(subject) else bool(check(subject))
        self.rows.append(
            {
                "phase": phase,
                "measure": measure,
                "value": value,
                "unit": unit,
                "ceiling": ceiling,
                "ratio": ratio,
                "target": target,
                "ok": ok,
            }
        )


def build_rows(suite: Suite) -> list[dict[str, Any]]:
    rows = _Rows(suite.points)
    _ingest_rows(suite, rows)
    _fetch_rows(suite, rows)
    _stream_rows(suite, rows)
    return rows.rows


def _ingest_rows(suite: Suite, rows: _Rows) -> None:
    for level in suite.mode.unary_levels:
        echo, hub = (
            rows.find("unary", "echo", concurrency=level),
            rows.find("unary", "dlrhub", concurrency=level),
        )
        if echo and hub:
            rows.add(
                "unary",
                f"unary Ingest, {level} in flight",
                hub["calls_per_s"],
                "calls/s",
                echo["calls_per_s"],
                ">= 0.85",
                lambda r: r >= 0.85,
            )
            rows.add("unary", f"  Ingest p50, {level} in flight", hub["p50_ms"], "ms", echo["p50_ms"])
            rows.add("unary", f"  Ingest p99, {level} in flight", hub["p99_ms"], "ms", echo["p99_ms"])
    echo_stream, batched = rows.find("client_stream", "echo"), rows.find("batched", "dlrhub")
    if echo_stream and batched:
        rows.add(
            "batched",
            f"batched Ingest ({batched['batch']}/call, {batched['concurrency']} in flight)",
            batched["items_per_s"],
            "reports/s",
            echo_stream["items_per_s"],
            ">= 0.5",
            lambda r: r >= 0.5,
        )


def _fetch_rows(suite: Suite, rows: _Rows) -> None:
    fetch_rows: dict[str, Point] = {}
    for label in ("10k", _count_label(suite.options.million)):
        for level in suite.mode.fetch_levels:
            hub, echo = (
                rows.find(f"fetch_{label}", "dlrhub", concurrency=level),
                rows.find("fetch_echo", "echo", concurrency=level),
            )
            if not (hub and echo):
                continue
            fetch_rows[f"{label}@{level}"] = hub
            phase = f"fetch_{label}"
            rows.add(
                phase,
                f"Fetch by id, {label} stored, {level} in flight",
                hub["calls_per_s"],
                "calls/s",
                echo["calls_per_s"],
                ">= 0.9",
                lambda r: r >= 0.9,
            )
            rows.add(phase, f"  Fetch p50, {label}, {level} in flight", hub["p50_ms"], "ms", echo["p50_ms"])
            rows.add(phase, f"  Fetch p99, {label}, {level} in flight", hub["p99_ms"], "ms", echo["p99_ms"])
            if hub.get("server_disk_read_mb_s", 0) >= 0.1:
                rows.add(
                    phase,
                    f"  server disk reads, {label}, {level} in flight",
                    hub["server_disk_read_mb_s"],
                    "MB/s",
                )
    million = _count_label(suite.options.million)
    for level in suite.mode.fetch_levels:
        big, small = fetch_rows.get(f"{million}@{level}"), fetch_rows.get(f"10k@{level}")
        if big and small:
            rows.add(
                f"fetch_{million}",
                f"Fetch p99 {million} vs 10k, {level} in flight",
                big["p99_ms"],
                "ms",
                small["p99_ms"],
                "<= 1.3",
                lambda r: r <= 1.3,
            )


def _stream_rows(suite: Suite, rows: _Rows) -> None:
    million = _count_label(suite.options.million)
    main = suite.options.stream_method.rpartition("/")[2]
    runs = [(main, subscribers) for subscribers in sorted({1, suite.options.subscribers})]
    runs.append(("Stream", suite.options.subscribers))  # the comparison run, if there was one
    for rpc, subscribers in dict.fromkeys(runs):
        echo = rows.find("fanout", "echo", subscribers=subscribers)
        hub = rows.find("fanout", "dlrhub", subscribers=subscribers, rpc=rpc)
        plural = "s" if subscribers > 1 else ""
        if echo and hub:
            # The target is judged on what the client libraries follow; the other is information.
            judged = rpc == main and subscribers == suite.options.subscribers and subscribers > 1
            rows.add(
                "fanout",
                f"{rpc} fan-out, {subscribers} subscriber{plural}, all keeping up",
                hub["messages_per_s"],
                "msgs/s",
                echo["messages_per_s"],
                ">= 0.7" if judged else "",
                (lambda r: r >= 0.7) if judged else None,
            )
            rows.add("fanout", "  at a paced Ingest of", hub["ingest_reports_per_s"], "reports/s")
        overload = rows.find("fanout_overload", "dlrhub", subscribers=subscribers, rpc=rpc)
        if echo and overload:
            rows.add(
                "fanout",
                f"{rpc} fan-out, {subscribers} subscriber{plural}, Ingest flat out",
                overload["messages_per_s"],
                "msgs/s",
                echo["messages_per_s"],
            )
    for fraction in suite.mode.latency_fractions:
        for subscribers in sorted({1, suite.options.subscribers}):
            point = rows.find("latency", "dlrhub", subscribers=subscribers, fraction=fraction)
            if not point:
                continue
            ack = point["ack_to_subscriber"]
            share = "half" if fraction == 0.5 else f"{fraction:g} x"
            where = f"{subscribers} sub{'s' if subscribers > 1 else ''} @ {share} peak"
            rows.add("latency", f"Ingest offered, {where}", point["offered_per_s"], "calls/s")
            rows.add("latency", f"Ingest achieved, {where}", point["ingest_calls_per_s"], "calls/s")
            rows.add("latency", f"ack->subscriber p50, {where}", ack["p50_ms"], "ms")
            is_target = fraction == 0.5
            rows.add(
                "latency",
                f"ack->subscriber p99, {where}",
                ack["p99_ms"],
                "ms",
                None,
                "<= 10 ms" if is_target else "",
                (lambda v: v <= 10) if is_target else None,
                on_value=True,
            )
    for key, figures in suite.rss.items():
        if "VmRSS" not in figures:
            continue
        is_million = key.startswith("after Fetch load") and million in key
        rows.add(
            "rss",
            f"server RSS, {key}",
            figures["VmRSS"] / 1024,
            "MiB",
            None,
            "<= 150 MiB" if is_million else "",
            (lambda v: v <= 150) if is_million else None,
            on_value=True,
        )


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    header = ("measure", "value", "ceiling", "ratio", "target", "result")
    body: list[tuple[str, ...]] = []
    for r in rows:
        value = _fmt(r["value"], r["unit"])
        ceiling = _fmt(r["ceiling"], r["unit"]) if r["ceiling"] is not None else ""
        ratio = "" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f}"
        result = {True: "PASS", False: "FAIL", None: ""}[r["ok"]]
        body.append((r["measure"], value, ceiling, ratio, r["target"], result))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:4], widths[1:4], strict=True)]
        cells += [line[4].ljust(widths[4]), line[5]]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    if unit == "MB/s":
        return f"{value:.1f} MB/s"
    return f"{value:,.0f} {unit}"


def comparison(suites: list[Suite]) -> str:
    """dlrhub and echo figures side by side, one column per event loop."""
    names = [r["measure"] for r in suites[0].rows]
    by_loop = [{r["measure"]: r for r in suite.rows} for suite in suites]
    header = ["measure", *(f"{s.event_loop}" for s in suites), *(f"{s.event_loop} ceiling" for s in suites)]
    lines: list[list[str]] = []
    for name in names:
        cells = [name]
        cells += [_fmt(rows[name]["value"], rows[name]["unit"]) if name in rows else "-" for rows in by_loop]
        cells += [
            _fmt(rows[name]["ceiling"], rows[name]["unit"])
            if name in rows and rows[name]["ceiling"] is not None
            else ""
            for rows in by_loop
        ]
        lines.append(cells)
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    out = ["event loops compared (dlrhub value, then the echo ceiling of the same run)"]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for line in lines:
        out.append(
            "  ".join(
                [line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))]
            )
        )
    return "\n".join(out)


# Entry point.


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="~2 minutes: short windows, 10k stored only")
    size.add_argument(
        "--full", action="store_true", help="longer windows, more levels, and the 1M-report database"
    )
    parser.add_argument(
        "--event-loop",
        choices=["asyncio", "uvloop", "both"],
        default="asyncio",
        help="event loop of both servers (dlrhub under uvloop via bench/serve_uvloop.py); both: run twice",
    )
    parser.add_argument("--procs", type=int, default=2, help="load processes for Ingest/Fetch (default 2)")
    parser.add_argument("--subscribers", type=int, default=10, help="the larger fan-out (default 10)")
    parser.add_argument("--batch", type=int, default=100, help="reports per batched Ingest (default 100)")
    parser.add_argument("--batch-inflight", type=int, default=8, help="batched calls in flight (default 8)")
    parser.add_argument("--million", type=int, default=1_000_000, help="reports in the large database")
    parser.add_argument("--profile", action="store_true", help="py-spy the server where a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the run's databases under bench/.cache/")
    parser.add_argument(
        "--patience",
        type=float,
        default=60.0,
        help="seconds to wait for other work on the machine to settle before each point (default 60)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="do not read the database into the page cache before each Fetch point",
    )
    parser.add_argument(
        "--subscriber-client",
        choices=["node", "python"],
        default="node",
        help="Stream subscribers (fan-out, latency; dlrhub and echo alike): bench/subscriber.js on "
        "@grpc/grpc-js (default), or grpc.aio processes (about four times the CPU per message)",
    )
    parser.add_argument(
        "--stream-rpc",
        choices=["StreamBatches", "Stream"],
        default="StreamBatches",
        help="what dlrhub's subscribers follow: StreamBatches (the client libraries' choice; the "
        "changes ready together in one message) or Stream (one message per change)",
    )
    parser.add_argument(
        "--only",
        default=",".join(sorted(PHASES)),
        help=f"comma-separated phases to run, of {', '.join(sorted(PHASES))} (latency needs unary)",
    )
    options = parser.parse_args(argv)
    only = frozenset(filter(None, options.only.split(",")))
    if only - PHASES:
        parser.error(f"--only: unknown phase(s) {', '.join(sorted(only - PHASES))}")
    if "latency" in only and "unary" not in only:
        parser.error("--only: latency needs unary (it runs at half of unary's peak rate)")
    mode = MODES["quick" if options.quick else "full" if options.full else "standard"]
    loops = ["asyncio", "uvloop"] if options.event_loop == "both" else [options.event_loop]
    return Options(
        mode=mode,
        loops=loops,
        procs=options.procs,
        subscribers=options.subscribers,
        batch=options.batch,
        batch_inflight=options.batch_inflight,
        stream_messages=1000,
        million=options.million,
        profile=options.profile,
        keep=options.keep,
        patience=options.patience,
        warm=not options.cold,
        only=only,
        subscriber_client=options.subscriber_client,
        stream_method=SERVICE + options.stream_rpc,
    )


def environment() -> dict[str, Any]:
    import google.protobuf  # noqa: PLC0415
    from google.protobuf.internal import api_implementation  # noqa: PLC0415

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "dirty_server_files": [
            line[3:] for line in git("status", "--porcelain", "--", "server").splitlines() if line.strip()
        ],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})",
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


@contextlib.contextmanager
def _workdir(stamp: str, keep: bool) -> Iterator[Path]:
    path = CACHE / f"run-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(
        f"dlrhub bench (commit {env['commit']}{', server/ modified' if env['dirty_server_files'] else ''}), "
        f"mode {options.mode.name}, event loop(s) {', '.join(options.loops)}; "
        f"Python {env['python']}, grpcio {env['grpcio']}, protobuf {env['protobuf']}, {env['cpus']} CPUs",
        flush=True,
    )
    started = time.monotonic()
    pool = Pool(options.procs, options.subscribers)
    suites: list[Suite] = []
    try:
        with _workdir(stamp, options.keep) as workdir:
            for event_loop in options.loops:
                suite = Suite(options, pool, event_loop, workdir, stamp)
                suite.run()
                suites.append(suite)
    finally:
        pool.close()
    elapsed = time.monotonic() - started
    for suite in suites:
        print()
        print(
            format_table(suite.rows, f"dlrhub vs echo ceiling — {suite.event_loop}, mode {options.mode.name}")
        )
    if not options.mode.million:
        print(f"(Fetch and RSS with {options.million:,} stored: run with --full)")
    if len(suites) > 1:
        print()
        print(comparison(suites))
    document = {
        "stamp": stamp,
        "mode": asdict(options.mode),
        "options": {k: v for k, v in asdict(options).items() if k != "mode"},
        "environment": env,
        "elapsed_s": elapsed,
        "suites": [
            {
                "event_loop": suite.event_loop,
                "stream_message_bytes": suite.stream_message_bytes,
                "rows": suite.rows,
                "points": suite.points,
                "rss_kib": suite.rss,
                "profiles": suite.profiles,
            }
            for suite in suites
        ],
    }
    json_path = RESULTS / f"{stamp}.json"
    json_path.write_text(json.dumps(_clean(document), indent=2, allow_nan=False) + "\n")
    png_path = RESULTS / f"{stamp}.png"
    try:
        from bench.plot import plot  # noqa: PLC0415  # matplotlib is the bench extra

        plot(document, png_path)
    except ImportError as error:
        print(f"no plot: {error} (pip install -e '.[bench]')")
        png_path = None  # type: ignore[assignment]
    print()
    print(
        f"figures: {json_path.relative_to(ROOT)}"
        + (f", plot: {png_path.relative_to(ROOT)}" if png_path else "")
    )
    print(f"took {elapsed:.0f} s")
    return 0


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, tuples lists, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
