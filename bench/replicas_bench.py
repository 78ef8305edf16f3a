"""Replicas over one PostgreSQL database (issue #15, point 9), in one run:

  ingest    batched Ingest (100 reports per call, 8 calls in flight) on one replica, then the same load
            split over two replicas of the same database: reports/s of each, and their ratio
  latency   unary Ingest to replica A paced at half of A's peak unary rate, with subscribers on
            replica B: Ingest ack -> subscriber on *another* replica, p50 and p99 (target p99 <= 20 ms)

    python -m bench.replicas_bench [--quick] [--db postgresql://...]

Without --db, a throwaway cluster from tools/pg_cluster.py (fsync and synchronous_commit on). The load
processes and the subscribers are the suite's (bench/load.py, bench/subscriber.js), on the same shared
measurement windows (bench/measurement.py). Prints a table and writes bench/results/replicas-<stamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence

from bench.common import INGEST, RESULTS
from bench.measurement import Pool, measure
from bench.options import MODES, Options
from bench.records import calls_point, latency_point
from bench.servers import Server, start_dlrhub
from tools import pg_cluster

SUBSCRIBERS = 2
P99_TARGET_MS = 20.0


@contextlib.contextmanager
def database(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    with pg_cluster.cluster() as running:
        yield running.url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter windows (1 s warm-up, 3 s)")
    parser.add_argument(
        "--db", help="a PostgreSQL URL to use (an empty database) instead of a throwaway cluster"
    )
    args = parser.parse_args(argv)
    options = Options(
        mode=MODES["quick" if args.quick else "standard"],
        loops=("asyncio",),
        procs=2,
        subscribers=SUBSCRIBERS,
        batch=100,
        batch_inflight=8,
        stream_messages=1000,
        million=0,
        profile=False,
        keep=False,
        patience=60.0,
    )
    pool = Pool(options.procs, SUBSCRIBERS)
    figures: dict[str, object] = {}
    try:
        with database(args.db) as url, contextlib.ExitStack() as servers:
            a = servers.enter_context(start_dlrhub(url, "asyncio"))
            figures["one_replica_reports_per_s"] = _batched(pool, options, [a])
            b = servers.enter_context(start_dlrhub(url, "asyncio"))
            figures["two_replicas_reports_per_s"] = _batched(pool, options, [a, b])
            peak = _unary_peak(pool, options, a)
            figures["unary_peak_calls_per_s"] = peak
            figures["latency"] = _latency(pool, options, a, b, peak / 2)
    finally:
        pool.close()
    one, two = figures["one_replica_reports_per_s"], figures["two_replicas_reports_per_s"]
    assert isinstance(one, float)
    assert isinstance(two, float)
    latency = figures["latency"]
    assert isinstance(latency, dict)
    print()
    print(f"batched Ingest, 1 replica      {one:>10,.0f} reports/s")
    print(f"batched Ingest, 2 replicas     {two:>10,.0f} reports/s   ratio {two / one:.2f}")
    print(f"unary Ingest peak, replica A   {peak:>10,.0f} calls/s")
    p50, p99 = latency["ack_to_subscriber"]["p50_ms"], latency["ack_to_subscriber"]["p99_ms"]
    verdict = "met" if p99 <= P99_TARGET_MS else "MISSED"
    print(
        f"ack on A -> subscriber on B at {peak / 2:,.0f} calls/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        f" (target p99 <= {P99_TARGET_MS:g} ms: {verdict}); {latency['missing']} missing"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"replicas-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(figures, indent=2, default=str))
    print(f"wrote {path}")
    return 0


def _batched(pool: Pool, options: Options, replicas: list[Server]) -> float:
    """Reports/s of batched Ingest, the calls in flight spread over the replicas (one load process
    each, at least)."""
    print(f"-- batched Ingest on {len(replicas)} replica(s)", flush=True)
    loaders = pool.loaders * max(1, len(replicas) // len(pool.loaders))
    jobs = [
        (
            worker,
            {
                "kind": "unary",
                "method": INGEST,
                "payload": "batch",
                "batch": options.batch,
                "concurrency": options.batch_inflight // len(loaders),
                "target": replicas[index % len(replicas)].address,
            },
        )
        for index, worker in enumerate(loaders)
    ]
    measured = measure(pool, options, replicas[0], jobs)
    point = calls_point(
        measured.results,
        options.mode.duration,
        measured.window,
        scenario="batched",
        target="dlrhub",
        concurrency=options.batch_inflight,
        batch=options.batch,
    )
    print(f"   {point.items_per_s:,.0f} reports/s", flush=True)
    return point.items_per_s


def _unary_peak(pool: Pool, options: Options, replica: Server) -> float:
    print("-- unary Ingest peak on replica A", flush=True)
    best = 0.0
    for concurrency in options.mode.unary_levels:
        jobs = [
            (
                worker,
                {"kind": "unary", "method": INGEST, "payload": "ingest", "concurrency": concurrency // 2},
            )
            for worker in pool.loaders
        ]
        measured = measure(pool, options, replica, jobs)
        point = calls_point(
            measured.results,
            options.mode.duration,
            measured.window,
            scenario="unary",
            target="dlrhub",
            concurrency=concurrency,
        )
        print(f"   {concurrency} in flight: {point.calls_per_s:,.0f} calls/s", flush=True)
        best = max(best, point.calls_per_s)
    return best


def _latency(pool: Pool, options: Options, a: Server, b: Server, rate: float) -> dict[str, object]:
    """Unary Ingest to `a` at `rate`, subscribers on `b` recording when each report arrives."""
    print(f"-- ack on A -> subscriber on B at {rate:,.0f} calls/s", flush=True)
    subscribers = [
        (
            worker,
            {
                "kind": "subscribe",
                "method": options.stream_method,
                "mode": "record",
                "grace": 3.0,
                "target": b.address,
            },
        )
        for worker in pool.subscribers
    ]
    loaders = [
        (
            worker,
            {
                "kind": "unary",
                "method": INGEST,
                "payload": "ingest",
                "concurrency": 64,
                "rate": rate / len(pool.loaders),
                "record_ids": True,
                "target": a.address,
            },
        )
        for worker in pool.loaders
    ]
    measured = measure(pool, options, a, subscribers + loaders, lead=2.0)
    results = measured.results
    point = latency_point(
        [r for r in results if "calls" in r],
        [r for r in results if "calls" not in r],
        options.mode.duration,
        measured.window,
        fraction=0.5,
        offered_per_s=rate,
    )
    return dataclasses.asdict(point)


if __name__ == "__main__":
    raise SystemExit(main())
