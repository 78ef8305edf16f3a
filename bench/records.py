"""What a run records: one frozen dataclass per kind of point, and each suite's result.

A point is one measurement window (bench/measurement.py), summarised here from the answers of the
load processes (bench/load.py; plain dicts): `CallsPoint` for unary and client-streaming calls
(Ingest, batched Ingest, Fetch, and their echo ceilings), `FanoutPoint` for server-streaming
subscribers, `LatencyPoint` for the time from an Ingest answer to each subscriber, `WriteCostPoint`
for the write path's cost per report of a hot message (bench/write_cost.py). The JSON results
are these records as `dataclasses.asdict` writes them, field for field (bench/README.md).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.load import Result


@dataclass(frozen=True)
class Latency:
    """Latencies in milliseconds, nearest-rank percentiles; NaN when there were none."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of_us(cls, latencies_us: Iterable[float]) -> Latency:
        ordered = sorted(latencies_us)

        def percentile(fraction: float) -> float:
            if not ordered:
                return math.nan
            return float(ordered[max(1, math.ceil(fraction * len(ordered))) - 1]) / 1000

        return cls(len(ordered), percentile(0.50), percentile(0.90), percentile(0.99), percentile(1.0))


@dataclass(frozen=True)
class Window:
    """What the machine did in one measurement window, in % of one core (of os.cpu_count())."""

    server_cpu_pct: float
    client_cpu_pct: float  # the load processes
    machine_busy_pct: float
    other_cpu_pct: float  # everything else: ~0, or something else ran in the window
    busy_before_pct: float  # the machine just before, once the bench had waited for it to settle
    server_disk_read_mb_s: float  # the server's page-cache misses: > 0, the figure is partly disk-bound


@dataclass(frozen=True, kw_only=True)
class CallsPoint:
    """Unary or client-streaming calls, `concurrency` in flight: unary Ingest, batched Ingest, Fetch,
    and their echo ceilings."""

    # unary, batched, client_stream (batched's ceiling), fetch_echo, fetch_10k, fetch_1M, and
    # fetch_history_10k, fetch_history_1M (Fetch with include_history)
    scenario: str
    target: str  # dlrhub or echo
    concurrency: int
    calls_per_s: float
    items_per_s: float  # reports (Ingest) or messages (the client-streaming echo)
    latency: Latency  # of a call
    errors: dict[str, int]  # calls that failed in the window, by status code
    not_accepted: int  # reports Ingest answered but did not accept
    processes: int  # load processes
    window: Window
    batch: int | None = None  # reports per batched Ingest call


@dataclass(frozen=True)
class Feed:
    """dlrhub's side of a fan-out point: the batched Ingest feeding the subscribers, and whether
    they kept up with it."""

    offered_reports_per_s: float | None  # the pace asked of Ingest; None: flat out
    ingest_reports_per_s: float  # what Ingest stored in the window
    overflows: float  # subscribers that fell a buffer behind (dlrhub_stream_overflows_total)
    kept_up: bool  # no overflow, each subscriber received the feed, Ingest ran at the pace offered


@dataclass(frozen=True, kw_only=True)
class FanoutPoint:
    """`subscribers` server-streaming subscriptions at once."""

    scenario: str  # fanout (the echo, or dlrhub's best kept-up point), fanout_search, fanout_overload
    target: str  # dlrhub or echo
    rpc: str  # ServerStream (the echo), StreamBatches or Stream
    subscribers: int
    messages_per_s: float  # to all subscribers together; for dlrhub, changes (several per batch)
    per_subscriber_min: float
    per_subscriber_max: float
    errors: dict[str, int]
    late_subscribers: int  # subscriptions not yet live when the warm-up began
    window: Window
    feed: Feed | None = None  # dlrhub's; None for the echo, which feeds itself


@dataclass(frozen=True, kw_only=True)
class LatencyPoint:
    """Unary Ingest paced at a share of its peak while subscribers follow the feed: how long after
    its Ingest answer each report reached each subscriber."""

    scenario: str = "latency"
    target: str = "dlrhub"
    subscribers: int
    fraction: float  # of the peak unary Ingest rate
    offered_per_s: float
    ingest_calls_per_s: float
    ingest_latency: Latency
    ingest_errors: dict[str, int]
    max_schedule_lag_ms: float  # how late the paced loaders sent a call, at worst
    ack_to_subscriber: Latency  # can be negative: a change is published right after its commit
    send_to_subscriber: Latency
    delivered: int  # (report, subscriber) pairs matched
    missing: int  # answered reports some subscriber did not receive
    window: Window


@dataclass(frozen=True, kw_only=True)
class WriteCostPoint:
    """The write path alone (bench/write_cost.py): the cost of applying one new report of a message
    that has `history` reports already, in groups of `group`."""

    scenario: str = "hot_message"
    target: str = "dlrhub"
    history: int
    group: int
    per_report_us: float  # the median of the rounds
    rounds_us: tuple[float, ...]


Point = CallsPoint | FanoutPoint | LatencyPoint | WriteCostPoint


@dataclass(frozen=True)
class ProfiledPhase:
    """A phase that missed a target, run once more with py-spy attached to the server."""

    phase: str
    calls_per_s: float
    items_per_s: float
    messages_per_s: float
    window: Window
    hotspots: dict[str, Any] | None  # profiling.Profile.as_dict(); None when py-spy failed


@dataclass(frozen=True)
class SuiteResult:
    """Every measurement of one event loop."""

    event_loop: str
    stream_message_bytes: int  # of one dlrhub StreamResponse: the size the echo fan-out sends
    points: tuple[Point, ...]
    rss_kib: dict[str, dict[str, int]]  # /proc status figures of the server at moments of the run
    profiles: tuple[ProfiledPhase, ...]


def calls_point(
    results: Sequence[Result],
    duration: float,
    window: Window,
    *,
    scenario: str,
    target: str,
    concurrency: int,
    batch: int | None = None,
) -> CallsPoint:
    return CallsPoint(
        scenario=scenario,
        target=target,
        concurrency=concurrency,
        calls_per_s=per_second(results, "calls", duration),
        items_per_s=per_second(results, "items", duration),
        latency=Latency.of_us(value for result in results for value in result.get("latencies_us", [])),
        errors=_errors(results),
        not_accepted=_total(results, "not_accepted"),
        processes=len(results),
        window=window,
        batch=batch,
    )


def fanout_point(
    subscribers: Sequence[Result],
    duration: float,
    window: Window,
    *,
    scenario: str,
    target: str,
    rpc: str,
    feed: Feed | None = None,
) -> FanoutPoint:
    rates = [result["messages"] / duration for result in subscribers]
    return FanoutPoint(
        scenario=scenario,
        target=target,
        rpc=rpc,
        subscribers=len(subscribers),
        messages_per_s=sum(rates),
        per_subscriber_min=min(rates, default=0.0),
        per_subscriber_max=max(rates, default=0.0),
        errors=_errors(subscribers),
        late_subscribers=sum(1 for result in subscribers if result.get("late")),
        window=window,
        feed=feed,
    )


def latency_point(
    loaders: Sequence[Result],
    subscribers: Sequence[Result],
    duration: float,
    window: Window,
    *,
    fraction: float,
    offered_per_s: float,
) -> LatencyPoint:
    """Each report's id matched between the loaders' Ingest answers and every subscriber."""
    acks = {mid: (sent, done) for result in loaders for mid, sent, done in result["records"]}
    ack_to_sub: list[float] = []
    send_to_sub: list[float] = []
    for result in subscribers:
        for mid, received in result["records"]:
            times = acks.get(mid)
            if times is not None:
                ack_to_sub.append((received - times[1]) / 1000)
                send_to_sub.append((received - times[0]) / 1000)
    return LatencyPoint(
        subscribers=len(subscribers),
        fraction=fraction,
        offered_per_s=offered_per_s,
        ingest_calls_per_s=per_second(loaders, "calls", duration),
        ingest_latency=Latency.of_us(value for result in loaders for value in result["latencies_us"]),
        ingest_errors=_errors(loaders),
        max_schedule_lag_ms=max((result.get("late_ns", 0) for result in loaders), default=0) / 1e6,
        ack_to_subscriber=Latency.of_us(ack_to_sub),
        send_to_subscriber=Latency.of_us(send_to_sub),
        delivered=len(ack_to_sub),
        missing=len(acks) * len(subscribers) - len(ack_to_sub),
        window=window,
    )


def per_second(results: Iterable[Result], key: str, duration: float) -> float:
    """The results' `key` (calls, items, messages) summed, per second of the window."""
    return _total(results, key) / duration


def count_label(count: int) -> str:
    """10000 -> "10k", 1000000 -> "1M": how phases and rows name a stored database."""
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    if count >= 1000 and count % 1000 == 0:
        return f"{count // 1000}k"
    return str(count)


def _total(results: Iterable[Result], key: str) -> int:
    return sum(int(result.get(key, 0)) for result in results)


def _errors(results: Iterable[Result]) -> dict[str, int]:
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result.get("errors", {}))
    return dict(errors)
