"""The measurements of one event loop, phase by phase, each against the echo ceiling of the same run.

  unary    unary Ingest vs the unary echo of the same bytes, at each level of calls in flight
  batched  batched Ingest vs the client-streaming echo, in reports (messages) per second
  webhook  POST /webhooks/gms of one report, at each level of calls in flight, and of 100-report
           batches, vs a do-nothing aiohttp handler on the same listener (bench/echo_server.py)
  fanout   the echo's bare fan-out to 1 and N subscribers; dlrhub's at the highest paced Ingest rate
           every subscriber keeps up with, and with Ingest flat out
  latency  Ingest ack -> subscriber, unary Ingest paced at shares of the peak unary rate
  fetch    Fetch by message id vs the unary echo of the same request bytes, 10k (and 1M) stored
  history  the same Fetch with include_history (#19.3: a history read was a full table scan)
  hot      in process, no gRPC: the write path's cost per new report of a message with 500 and
           10,000 reports of history (bench/write_cost.py; #19.2)
  postgres batched Ingest over PostgreSQL (a throwaway cluster, tools/pg_cluster.py) vs over SQLite,
           both in this run (#15.9)

With --profile, a phase that misses a target runs its load once more with py-spy on the server.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
from google.protobuf.timestamp_pb2 import Timestamp

from bench import measurement, preload, profiling, report, write_cost
from bench.common import (
    CACHE,
    ECHO_CLIENT_STREAM,
    ECHO_SERVER_STREAM,
    ECHO_UNARY,
    FETCH,
    INGEST,
    RESULTS,
    STREAM,
    STREAM_BATCHES,
    gms_report,
    live_id,
    proc_status,
    warm_page_cache,
)
from bench.load import Job, Result
from bench.measurement import Measured, Pool
from bench.options import INGEST_PHASES, Options
from bench.records import (
    CallsPoint,
    FanoutPoint,
    Feed,
    LatencyPoint,
    Point,
    ProfiledPhase,
    SuiteResult,
    WriteCostPoint,
    calls_point,
    count_label,
    fanout_point,
    latency_point,
    per_second,
)
from bench.servers import Server, runs_uvloop, start_dlrhub, start_echo
from deliveryreport.v1.delivery_report_service_pb2 import Format, StreamChange, StreamResponse
from dlrhub.merge import merge
from dlrhub.normalise import Normaliser
from tools import pg_cluster

P = TypeVar("P", CallsPoint, FanoutPoint, LatencyPoint, WriteCostPoint)
# The target of the points measured on dlrhub over PostgreSQL.
POSTGRES = "dlrhub-pg"
Jobs = list[tuple[int, Job]]  # (load process, job)


def run(options: Options, stamp: str) -> list[SuiteResult]:
    """One suite per event loop of the options, one after the other, on one pool of load processes."""
    pool = Pool(options.procs, options.subscribers)
    try:
        with _workdir(stamp, options.keep) as workdir:
            size = _stream_message_bytes()
            return [_run_loop(Suite(options, pool, loop, workdir, stamp, size)) for loop in options.loops]
    finally:
        pool.close()


@dataclass
class Suite:
    """One event loop's measurements: where they run, and what they have recorded so far."""

    options: Options
    pool: Pool
    event_loop: str
    workdir: Path
    stamp: str
    stream_message_bytes: int  # of one dlrhub StreamResponse: what the echo fan-out sends
    points: list[Point] = field(default_factory=list)
    rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    profiles: list[ProfiledPhase] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.options.mode.duration

    def measure(
        self, server: Server, jobs: Jobs, *, lead: float = 0.6, profile_to: Path | None = None
    ) -> Measured:
        return measurement.measure(self.pool, self.options, server, jobs, lead=lead, profile_to=profile_to)

    def record(self, point: P) -> P:
        """Keeps the point, and prints it."""
        self.points.append(point)
        print(report.progress_line(point), flush=True)
        return point

    def result(self) -> SuiteResult:
        return SuiteResult(
            self.event_loop,
            self.stream_message_bytes,
            tuple(self.points),
            dict(self.rss_kib),
            tuple(self.profiles),
        )


def _run_loop(suite: Suite) -> SuiteResult:
    options = suite.options
    if "hot" in options.only:
        print("-- write cost per report of a hot message, by its history (in process)", flush=True)
        for point in write_cost.measure(suite.workdir):
            suite.record(point)
    echo = start_echo(suite.event_loop)
    print(f"echo server: {echo.address} ({echo.ready.get('loop', '')})", flush=True)
    try:
        if options.only & INGEST_PHASES:
            db = suite.workdir / f"ingest-{suite.event_loop}.db"
            hub = start_dlrhub(db, suite.event_loop)
            print(f"dlrhub: {hub.address} (uvloop loaded: {runs_uvloop(hub)}), db {db}", flush=True)
            try:
                _ingest_and_stream(suite, echo, hub)
                stored = {"stored": _stored_count(hub)}
                suite.rss_kib["after the Ingest and Stream phases"] = proc_status(hub.pid) | stored
            finally:
                hub.stop()
        if "postgres" in options.only:
            _postgres(suite)
        if options.only & {"fetch", "history"}:
            small = suite.workdir / "fetch-10k.db"
            shutil.copyfile(preload.ensure(10_000), small)
            _fetch(suite, echo, 10_000, small)
            if options.mode.million:
                print(f"-- preparing the {options.million:,}-report database (cached)", flush=True)
                _fetch(suite, echo, options.million, preload.ensure(options.million))
    finally:
        echo.stop()
    return suite.result()


def _ingest_and_stream(suite: Suite, echo: Server, hub: Server) -> None:
    only, subscribers = suite.options.only, suite.options.subscribers
    peak: CallsPoint | None = None
    if "unary" in only:
        peak = _unary(suite, echo, hub)
        level = peak.concurrency
        _profile_if_missed(suite, "unary", hub, lambda: _unary_jobs(suite, INGEST, "ingest", level))
    if "batched" in only:
        _batched(suite, echo, hub)
        _profile_if_missed(suite, "batched", hub, lambda: _batch_jobs(suite))
    if "webhook" in only:
        _webhook(suite, echo, hub)
        top = max(suite.options.mode.unary_levels)
        _profile_if_missed(suite, "webhook", hub, lambda: _webhook_jobs(suite, hub, top))
        _profile_if_missed(suite, "webhook_batch", hub, lambda: _webhook_jobs(suite, hub, batched=True))
    if "fanout" in only:
        _fanout(suite, echo, hub)
        method = suite.options.stream_method
        _profile_if_missed(
            suite,
            "fanout",
            hub,
            lambda: _subscriber_jobs(suite, subscribers, method, "count") + _batch_jobs(suite),
        )
    if "latency" in only and peak is not None:
        rate = peak.calls_per_s
        _latency(suite, hub, rate)
        _profile_if_missed(suite, "latency", hub, lambda: _latency_jobs(suite, rate / 2, subscribers))


# The phases.


def _unary(suite: Suite, echo: Server, hub: Server) -> CallsPoint:
    """Unary Ingest vs the unary echo of the same bytes, at each level; dlrhub's peak point."""
    print(f"-- unary Ingest vs unary echo ({suite.event_loop})", flush=True)
    hub_points = []
    for concurrency in suite.options.mode.unary_levels:
        _unary_point(suite, "unary", echo, ECHO_UNARY, "ingest", concurrency)
        hub_points.append(_unary_point(suite, "unary", hub, INGEST, "ingest", concurrency))
    return max(hub_points, key=lambda point: point.calls_per_s)


def _unary_point(
    suite: Suite, scenario: str, server: Server, method: str, payload: str, concurrency: int, **extra: Any
) -> CallsPoint:
    measured = suite.measure(server, _unary_jobs(suite, method, payload, concurrency, **extra))
    return suite.record(
        calls_point(
            measured.results,
            suite.duration,
            measured.window,
            scenario=scenario,
            target=server.name,
            concurrency=concurrency,
        )
    )


def _batched(suite: Suite, echo: Server, hub: Server) -> None:
    """Batched Ingest (reports/s) vs the client-streaming echo of single-report requests (messages/s)."""
    print(f"-- batched Ingest vs client-streaming echo ({suite.event_loop})", flush=True)
    options = suite.options
    streams = _split(options.batch_inflight, options.procs)
    jobs: Jobs = [
        (
            worker,
            {
                "kind": "client_stream",
                "method": ECHO_CLIENT_STREAM,
                "concurrency": max(1, share // 2),
                "messages": options.stream_messages,
            },
        )
        for worker, share in zip(suite.pool.loaders, streams, strict=False)
    ]
    measured = suite.measure(echo, jobs)
    suite.record(
        calls_point(
            measured.results,
            suite.duration,
            measured.window,
            scenario="client_stream",
            target="echo",
            concurrency=len(jobs),
        )
    )
    _batched_point(suite, hub, "dlrhub")


def _batched_point(suite: Suite, hub: Server, target: str) -> CallsPoint:
    """Batched Ingest on `hub`, recorded as `target`'s."""
    options = suite.options
    measured = suite.measure(hub, _batch_jobs(suite))
    return suite.record(
        calls_point(
            measured.results,
            suite.duration,
            measured.window,
            scenario="batched",
            target=target,
            concurrency=options.batch_inflight,
            batch=options.batch,
        )
    )


def _postgres(suite: Suite) -> None:
    """Batched Ingest over PostgreSQL against the same over SQLite in this run (measured here too,
    on a new file, unless the batched phase has run)."""
    print(f"-- batched Ingest over PostgreSQL vs over SQLite ({suite.event_loop})", flush=True)
    if not any(
        isinstance(p, CallsPoint) and (p.scenario, p.target) == ("batched", "dlrhub") for p in suite.points
    ):
        hub = start_dlrhub(suite.workdir / f"batched-{suite.event_loop}.db", suite.event_loop)
        try:
            _batched_point(suite, hub, "dlrhub")
        finally:
            hub.stop()
    with pg_cluster.cluster() as cluster:
        hub = start_dlrhub(cluster.url, suite.event_loop)
        print(f"dlrhub: {hub.address} over PostgreSQL ({cluster.bin_dir.parent.name})", flush=True)
        try:
            _batched_point(suite, hub, POSTGRES)
        finally:
            hub.stop()


def _webhook(suite: Suite, echo: Server, hub: Server) -> None:
    """POST /webhooks/gms of one report at each level, and of `batch` reports, vs the echo's
    do-nothing handler on the same listener settings."""
    print(f"-- webhook POSTs vs a do-nothing aiohttp handler ({suite.event_loop})", flush=True)
    options = suite.options
    runs = [(level, False) for level in options.mode.unary_levels] + [(options.batch_inflight, True)]
    for concurrency, batched in runs:
        for server in (echo, hub):
            measured = suite.measure(server, _webhook_jobs(suite, server, concurrency, batched=batched))
            suite.record(
                calls_point(
                    measured.results,
                    suite.duration,
                    measured.window,
                    scenario="webhook_batch" if batched else "webhook",
                    target=server.name,
                    concurrency=concurrency,
                    batch=options.batch if batched else None,
                )
            )


def _fanout(suite: Suite, echo: Server, hub: Server) -> None:
    """The echo's fan-out to 1 and N subscribers; dlrhub's with Ingest flat out, then at the highest
    paced rate every subscriber keeps up with (and the same on Stream, for comparison)."""
    print(f"-- Stream fan-out ({suite.event_loop})", flush=True)
    options = suite.options
    counts = sorted({1, options.subscribers})
    for subscribers in counts:
        size = suite.stream_message_bytes
        jobs: Jobs = [
            (worker, {"kind": "server_stream", "method": ECHO_SERVER_STREAM, "size": size})
            for worker in suite.pool.subscribers[:subscribers]
        ]
        measured = suite.measure(echo, jobs)
        suite.record(
            fanout_point(
                measured.results,
                suite.duration,
                measured.window,
                scenario="fanout",
                target="echo",
                rpc="ServerStream",
            )
        )
    runs = [(options.stream_method, subscribers) for subscribers in counts]
    if options.stream_method == STREAM_BATCHES and options.subscribers > 1:
        runs.append((STREAM, options.subscribers))  # one change per message, for comparison
    for method, subscribers in runs:
        overload = _fanout_point(suite, hub, subscribers, None, method)
        best = _sustainable_fanout(suite, hub, subscribers, overload.per_subscriber_min, method)
        if best is not None:
            suite.points.append(replace(best, scenario="fanout"))  # the one the table shows


def _fanout_point(
    suite: Suite, hub: Server, subscribers: int, rate: float | None, method: str
) -> FanoutPoint:
    """`subscribers` live subscriptions to `method` (Stream or StreamBatches) while batched Ingest
    runs at `rate` reports/s (None: flat out)."""
    options = suite.options
    loaders = _batch_jobs(suite)
    if rate is not None:
        calls_per_s = rate / options.batch / options.procs
        loaders = [(worker, {**job, "rate": calls_per_s}) for worker, job in loaders]
    overflows_before = _stream_overflows(hub)
    measured = suite.measure(hub, _subscriber_jobs(suite, subscribers, method, "count") + loaders, lead=2.0)
    overflows = _stream_overflows(hub) - overflows_before
    ingest_results, received = _loaders_and_subscribers(measured.results)
    point = fanout_point(
        received,
        suite.duration,
        measured.window,
        scenario="fanout_search" if rate is not None else "fanout_overload",
        target="dlrhub",
        rpc=method.rpartition("/")[2],
    )
    ingest = per_second(ingest_results, "items", suite.duration)
    # Kept up: no subscriber ever fell a buffer behind (all were served live, none caught up from
    # the store), each received the feed, and Ingest ran at the rate offered.
    kept_up = (
        overflows == 0
        and point.per_subscriber_min >= 0.9 * ingest
        and (rate is None or ingest >= 0.97 * rate)
    )
    return suite.record(replace(point, feed=Feed(rate, ingest, overflows, kept_up)))


def _sustainable_fanout(
    suite: Suite, hub: Server, subscribers: int, start: float, method: str
) -> FanoutPoint | None:
    """The highest paced Ingest rate at which every subscriber keeps up, found in a few steps
    (grow by half until one falls behind, then bisect); that point, or None if none kept up."""
    best: FanoutPoint | None = None
    low = 0.0  # the highest rate kept up with so far
    high: float | None = None  # the lowest rate not kept up with
    rate = max(start, 100.0)
    for _ in range(suite.options.mode.fanout_steps):
        point = _fanout_point(suite, hub, subscribers, rate, method)
        if point.feed is not None and point.feed.kept_up:
            best, low = point, rate
            rate = rate * 1.5 if high is None else (rate + high) / 2
        else:
            high = rate
            rate = (low + rate) / 2 if best is not None else rate / 2
    return best


def _latency(suite: Suite, hub: Server, peak: float) -> None:
    """Ingest ack -> subscriber latency, unary Ingest paced at each share of the peak unary rate."""
    for fraction in suite.options.mode.latency_fractions:
        rate = peak * fraction
        print(
            f"-- Ingest ack -> subscriber latency at {fraction:g} x peak = {rate:,.0f} calls/s"
            f" ({suite.event_loop})",
            flush=True,
        )
        for subscribers in sorted({1, suite.options.subscribers}):
            measured = suite.measure(hub, _latency_jobs(suite, rate, subscribers), lead=2.0)
            loaders, received = _loaders_and_subscribers(measured.results)
            suite.record(
                latency_point(
                    loaders, received, suite.duration, measured.window, fraction=fraction, offered_per_s=rate
                )
            )


def _fetch(suite: Suite, echo: Server, stored: int, db: Path) -> None:
    """Fetch by random stored message ids (phase fetch), and with their history (phase history),
    `stored` in the database, vs the unary echo of the same request bytes (measured once per level);
    the server's RSS idle and after the load."""
    print(f"-- Fetch by message id, {stored:,} stored ({suite.event_loop})", flush=True)
    levels, label = suite.options.mode.fetch_levels, count_label(stored)
    payloads = [
        (payload, scenario)
        for phase, payload, scenario in (
            ("fetch", "fetch", f"fetch_{label}"),
            ("history", "fetch_history", f"fetch_history_{label}"),
        )
        if phase in suite.options.only
    ]
    hub = start_dlrhub(db, suite.event_loop)
    try:
        suite.rss_kib[f"idle, {label} stored"] = proc_status(hub.pid)
        for concurrency in levels:
            if not any(
                isinstance(point, CallsPoint)
                and point.scenario == "fetch_echo"
                and point.concurrency == concurrency
                for point in suite.points
            ):
                _unary_point(suite, "fetch_echo", echo, ECHO_UNARY, "fetch", concurrency, stored=stored)
            for payload, scenario in payloads:
                if suite.options.warm:
                    # This VM reclaims idle page cache within seconds (DAMON): without this, a big
                    # file is read from disk and the figure measures the disk (see README).
                    warm_page_cache(db)
                _unary_point(suite, scenario, hub, FETCH, payload, concurrency, stored=stored)
        suite.rss_kib[f"after Fetch load, {label} stored"] = proc_status(hub.pid)
        _profile_if_missed(
            suite,
            f"fetch_{label}",
            hub,
            lambda: _unary_jobs(suite, FETCH, "fetch", max(levels), stored=stored),
        )
    finally:
        hub.stop()


def _profile_if_missed(suite: Suite, phase: str, server: Server, jobs: Callable[[], Jobs]) -> None:
    """Runs the phase's load again with py-spy on the server, if asked and a target was missed."""
    if not suite.options.profile:
        return
    rows = report.rows(suite.options, suite.result())
    missed = [row.measure for row in rows if row.phase == phase and row.ok is False]
    if not missed:
        return
    print(f"-- profiling {phase} (missed: {', '.join(missed)})", flush=True)
    raw = RESULTS / f"{suite.stamp}-profile-{phase}-{suite.event_loop}.raw"
    measured = suite.measure(server, jobs(), lead=1.0, profile_to=raw)
    if measured.hotspots is not None:
        text = profiling.format_profile(f"{phase} ({suite.event_loop})", measured.hotspots)
        raw.with_suffix(".txt").write_text(text + "\n")
        print(text, flush=True)
    suite.profiles.append(
        ProfiledPhase(
            phase,
            calls_per_s=per_second(measured.results, "calls", suite.duration),
            items_per_s=per_second(measured.results, "items", suite.duration),
            messages_per_s=per_second(measured.results, "messages", suite.duration),
            window=measured.window,
            hotspots=measured.hotspots,
        )
    )


# The jobs of the load processes (bench/load.py).


def _unary_jobs(suite: Suite, method: str, payload: str, concurrency: int, **extra: Any) -> Jobs:
    """`concurrency` unary calls in flight, spread over the loaders."""
    shares = _split(concurrency, suite.options.procs)
    return [
        (worker, {"kind": "unary", "method": method, "payload": payload, "concurrency": share, **extra})
        for worker, share in zip(suite.pool.loaders, shares, strict=False)
    ]


def _batch_jobs(suite: Suite) -> Jobs:
    options = suite.options
    return _unary_jobs(suite, INGEST, "batch", options.batch_inflight, batch=options.batch)


def _webhook_jobs(suite: Suite, server: Server, concurrency: int = 0, *, batched: bool = False) -> Jobs:
    """POSTs to the server's /webhooks/gms, `concurrency` in flight (batched: `batch_inflight`)
    over the loaders, of one report each (batched: `batch`); dlrhub's answers are checked."""
    options = suite.options
    job: Job = {
        "kind": "webhook",
        "url": f"http://{server.http_address}/webhooks/gms",
        "payload": "batch" if batched else "ingest",
        "batch": options.batch,
        "count_accepted": server.name == "dlrhub",
    }
    shares = _split(options.batch_inflight if batched else concurrency, options.procs)
    return [
        (worker, {**job, "concurrency": share})
        for worker, share in zip(suite.pool.loaders, shares, strict=False)
    ]


def _subscriber_jobs(suite: Suite, count: int, method: str, mode: str, **extra: Any) -> Jobs:
    """`count` subscriptions to `method`; mode "count" counts changes, "record" records their ids."""
    return [
        (worker, {"kind": "subscribe", "method": method, "mode": mode, **extra})
        for worker in suite.pool.subscribers[:count]
    ]


def _latency_jobs(suite: Suite, rate: float, subscribers: int) -> Jobs:
    options = suite.options
    subs = _subscriber_jobs(suite, subscribers, options.stream_method, "record", grace=3.0)
    rate_each = rate / options.procs
    return subs + _unary_jobs(suite, INGEST, "ingest", 64 * options.procs, rate=rate_each, record_ids=True)


def _split(total: int, parts: int) -> list[int]:
    """`total` spread over at most `parts` processes (no process gets 0)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def _loaders_and_subscribers(results: list[Result]) -> tuple[list[Result], list[Result]]:
    """The Ingest loaders' answers (they count calls) apart from the subscribers'."""
    return [r for r in results if "calls" in r], [r for r in results if "calls" not in r]


# What the bench reads off a running dlrhub.


def _stream_overflows(server: Server) -> float:
    """dlrhub_stream_overflows_total of the running dlrhub, from its /metrics."""
    response = httpx.get(f"http://127.0.0.1:{server.admin_port}/metrics", timeout=10)
    response.raise_for_status()
    for line in response.text.splitlines():
        if line.startswith("dlrhub_stream_overflows_total "):
            return float(line.split()[1])
    raise RuntimeError("dlrhub_stream_overflows_total is missing from /metrics")


def _stored_count(server: Server) -> int:
    """Reports in the server's store: the latest cursor, from the opening heartbeat of a Stream."""
    with grpc.insecure_channel(server.address) as channel:
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
    state = merge(None, item.report).report
    return StreamResponse(cursor="1000000", change=StreamChange(report=item.report, state=state)).ByteSize()


@contextlib.contextmanager
def _workdir(stamp: str, keep: bool) -> Iterator[Path]:
    path = CACHE / f"run-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
