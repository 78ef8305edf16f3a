"""What a run reports: a line per point as it is measured; then the table of verdicts against the
targets (measure, value, ceiling, ratio, target, result), bench/results/<stamp>.json (every figure
and every point; bench/README.md) and the plot, bench/results/<stamp>.png.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from bench.common import RESULTS, ROOT
from bench.options import Options
from bench.records import (
    CallsPoint,
    FanoutPoint,
    LatencyPoint,
    Point,
    SuiteResult,
    WriteCostPoint,
    count_label,
)
from bench.write_cost import HISTORIES

P = TypeVar("P", CallsPoint, FanoutPoint, LatencyPoint, WriteCostPoint)


@dataclass(frozen=True)
class Row:
    """One line of the table: a dlrhub figure, its echo ceiling, and the verdict on its target."""

    phase: str  # the phase whose load --profile runs again when the row fails
    measure: str
    value: float
    unit: str
    ceiling: float | None
    ratio: float  # value / ceiling; NaN without a ceiling
    target: str  # ">= 0.85" (judged on the ratio), "<= 10 ms" (on the value); "" for information
    ok: bool | None  # None: no target, or no figure to judge


@dataclass(frozen=True)
class Environment:
    """What the figures were measured on."""

    commit: str
    dirty_server_files: list[str]  # server/ files changed since the commit
    python: str
    grpcio: str
    protobuf: str
    cpus: int | None
    platform: str


# While the run goes: one line per point.


def progress_line(point: Point) -> str:
    if isinstance(point, WriteCostPoint):
        rounds = ", ".join(f"{value:.0f}" for value in point.rounds_us)
        return (
            f"  {point.target:6} {point.scenario:13} history={point.history:<6,} "
            f"{point.per_report_us:8.1f} us per report (median; rounds of {point.group}: {rounds})"
        )
    window = point.window
    cpu = (
        f"server {window.server_cpu_pct:.0f}% cpu, clients {window.client_cpu_pct:.0f}%,"
        f" other {window.other_cpu_pct:.0f}% (of {100 * (os.cpu_count() or 1)}%)"
    )
    if isinstance(point, FanoutPoint):
        return _fanout_line(point, cpu)
    if isinstance(point, LatencyPoint):
        ack = point.ack_to_subscriber
        return (
            f"  {point.target:6} {point.scenario:13} subs={point.subscribers:<3} "
            f"ingest {point.ingest_calls_per_s:,.0f}/s of {point.offered_per_s:,.0f} offered; "
            f"ack->sub p50 {ack.p50_ms:.2f} ms p99 {ack.p99_ms:.2f} ms; missing {point.missing}; {cpu}"
        )
    errors = f" errors={point.errors}" if point.errors else ""
    if point.window.server_disk_read_mb_s >= 0.1:
        errors += f"; server read {point.window.server_disk_read_mb_s:.1f} MB/s from disk"
    rejected = f" not-accepted={point.not_accepted}" if point.not_accepted else ""
    return (
        f"  {point.target:6} {point.scenario:13} c={point.concurrency:<4} {point.calls_per_s:>9,.0f} calls/s"
        f" {point.items_per_s:>9,.0f} items/s  p50 {point.latency.p50_ms:6.2f} ms"
        f" p99 {point.latency.p99_ms:6.2f} ms; {cpu}{errors}{rejected}"
    )


def _fanout_line(point: FanoutPoint, cpu: str) -> str:
    extra = ""
    if point.feed is not None:
        feed = point.feed
        offered = feed.offered_reports_per_s
        pace = f"of {offered:,.0f} offered" if offered else "flat out"
        if feed.kept_up:
            verdict = "every subscriber kept up"
        elif feed.overflows == 0 and point.per_subscriber_min >= 0.9 * feed.ingest_reports_per_s:
            verdict = "the subscribers kept up, but Ingest fell short of the rate offered"
        else:
            verdict = f"subscribers fell behind ({feed.overflows:.0f} buffer overflows)"
        extra = f", ingest {feed.ingest_reports_per_s:,.0f} reports/s {pace}: {verdict}"
    label = {"fanout_search": "fanout paced", "fanout_overload": "fanout"}.get(point.scenario, point.scenario)
    if point.rpc == "Stream":
        label += " (Stream)"
    return (
        f"  {point.target:6} {label:13} subs={point.subscribers:<3} "
        f"{point.messages_per_s:>9,.0f} msgs/s (per sub {point.per_subscriber_min:,.0f}"
        f"..{point.per_subscriber_max:,.0f}){extra}; {cpu}"
    )


# The verdicts.


def rows(options: Options, suite: SuiteResult) -> list[Row]:
    """The table's rows: each dlrhub figure beside its ceiling, judged against its target."""
    table = _Table(suite.points)
    _ingest_rows(options, table)
    _webhook_rows(options, table)
    _write_cost_rows(table)
    _fetch_rows(options, table)
    _stream_rows(options, table)
    _latency_rows(options, table)
    million = count_label(options.million)
    for key, figures in suite.rss_kib.items():
        if "VmRSS" not in figures:
            continue
        judged = key.startswith("after Fetch load") and million in key
        table.add(
            "rss",
            f"server RSS, {key}",
            figures["VmRSS"] / 1024,
            "MiB",
            None,
            "<= 150 MiB" if judged else "",
            (lambda v: v <= 150) if judged else None,
            on_value=True,
        )
    return table.rows


class _Table:
    """Rows being built from the points of a suite."""

    def __init__(self, points: Sequence[Point]) -> None:
        self.points = points
        self.rows: list[Row] = []

    def find(self, kind: type[P], scenario: str, target: str, **fields: object) -> P | None:
        """The first point of that kind, scenario and target whose `fields` have those values."""
        for point in self.points:
            if (
                isinstance(point, kind)
                and point.scenario == scenario
                and point.target == target
                and all(getattr(point, name) == value for name, value in fields.items())
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
        """A row; `check` judges the ratio to the ceiling, or with `on_value` the value itself."""
        ratio = value / ceiling if ceiling else math.nan
        subject = value if on_value else ratio
        ok = None if check is None or math.isnan(subject) else bool(check(subject))
        self.rows.append(Row(phase, measure, value, unit, ceiling, ratio, target, ok))


def _ingest_rows(options: Options, table: _Table) -> None:
    for level in options.mode.unary_levels:
        echo = table.find(CallsPoint, "unary", "echo", concurrency=level)
        hub = table.find(CallsPoint, "unary", "dlrhub", concurrency=level)
        if echo and hub:
            table.add(
                "unary",
                f"unary Ingest, {level} in flight",
                hub.calls_per_s,
                "calls/s",
                echo.calls_per_s,
                ">= 0.85",
                lambda r: r >= 0.85,
            )
            table.add(
                "unary", f"  Ingest p50, {level} in flight", hub.latency.p50_ms, "ms", echo.latency.p50_ms
            )
            table.add(
                "unary", f"  Ingest p99, {level} in flight", hub.latency.p99_ms, "ms", echo.latency.p99_ms
            )
    echo_stream = table.find(CallsPoint, "client_stream", "echo")
    batched = table.find(CallsPoint, "batched", "dlrhub")
    if echo_stream and batched:
        table.add(
            "batched",
            f"batched Ingest ({batched.batch}/call, {batched.concurrency} in flight)",
            batched.items_per_s,
            "reports/s",
            echo_stream.items_per_s,
            ">= 0.5",
            lambda r: r >= 0.5,
        )
    on_postgres = table.find(CallsPoint, "batched", "dlrhub-pg")
    if batched and on_postgres:  # the ceiling here is the same load over SQLite
        table.add(
            "postgres",
            f"batched Ingest over PostgreSQL, vs SQLite ({on_postgres.batch}/call)",
            on_postgres.items_per_s,
            "reports/s",
            batched.items_per_s,
            ">= 0.8",
            lambda r: r >= 0.8,
        )


def _webhook_rows(options: Options, table: _Table) -> None:
    """POSTs of one report, judged at each level against the do-nothing handler's POSTs. POSTs of
    `batch` reports, judged in reports per second against the most reports per second the handler
    took one per POST (as batched Ingest is judged against the stack's single-report messages); and
    for information, in POSTs per second against the handler's POSTs of the same bodies."""
    singles = []
    for level in options.mode.unary_levels:
        echo = table.find(CallsPoint, "webhook", "echo", concurrency=level)
        hub = table.find(CallsPoint, "webhook", "dlrhub", concurrency=level)
        if echo and hub:
            singles.append(echo.calls_per_s)
            table.add(
                "webhook",
                f"webhook, 1 report per POST, {level} in flight",
                hub.calls_per_s,
                "POSTs/s",
                echo.calls_per_s,
                ">= 0.7",
                lambda r: r >= 0.7,
            )
            p99 = f"  webhook p99, {level} in flight"
            table.add("webhook", p99, hub.latency.p99_ms, "ms", echo.latency.p99_ms)
    echo = table.find(CallsPoint, "webhook_batch", "echo")
    hub = table.find(CallsPoint, "webhook_batch", "dlrhub")
    if hub and singles:
        table.add(
            "webhook_batch",
            f"webhook, {hub.batch} reports per POST, {hub.concurrency} in flight",
            hub.items_per_s,
            "reports/s",
            max(singles),
            ">= 0.5",
            lambda r: r >= 0.5,
        )
    if echo and hub:
        same = f"  in POSTs/s, vs the handler's POSTs of the same {hub.batch}-report bodies"
        table.add("webhook_batch", same, hub.calls_per_s, "POSTs/s", echo.calls_per_s)


def _write_cost_rows(table: _Table) -> None:
    """The cost per new report of a hot message (bench/write_cost.py), judged on the long history
    against the short one: it must not grow with the history (#19.2)."""
    short, long = HISTORIES
    base = table.find(WriteCostPoint, "hot_message", "dlrhub", history=short)
    hot = table.find(WriteCostPoint, "hot_message", "dlrhub", history=long)
    if base and hot:
        table.add("hot", f"write cost per report, {short:,} reports of history", base.per_report_us, "us")
        table.add(
            "hot",
            f"write cost per report, {long:,} vs {short:,} reports of history",
            hot.per_report_us,
            "us",
            base.per_report_us,
            "<= 1.25",
            lambda r: r <= 1.25,
        )


# Fetch by id (judged against the echo), and with include_history (information: a history read was a
# full table scan, #19.3); both judged on their p99 with 1M stored against 10k.
_FETCHES = (
    ("fetch", "Fetch by id", "Fetch", True),
    ("fetch_history", "Fetch with history", "Fetch with history", False),
)


def _fetch_rows(options: Options, table: _Table) -> None:
    million = count_label(options.million)
    for scenario, title, short, judged in _FETCHES:
        for label in ("10k", million):
            phase = f"{scenario}_{label}"
            for level in options.mode.fetch_levels:
                hub = table.find(CallsPoint, phase, "dlrhub", concurrency=level)
                echo = table.find(CallsPoint, "fetch_echo", "echo", concurrency=level)
                if not (hub and echo):
                    continue
                table.add(
                    phase,
                    f"{title}, {label} stored, {level} in flight",
                    hub.calls_per_s,
                    "calls/s",
                    echo.calls_per_s,
                    ">= 0.9" if judged else "",
                    (lambda r: r >= 0.9) if judged else None,
                )
                where = f"{label}, {level} in flight"
                table.add(phase, f"  {short} p50, {where}", hub.latency.p50_ms, "ms", echo.latency.p50_ms)
                table.add(phase, f"  {short} p99, {where}", hub.latency.p99_ms, "ms", echo.latency.p99_ms)
                if hub.window.server_disk_read_mb_s >= 0.1:
                    table.add(
                        phase,
                        f"  server disk reads, {label}, {level} in flight",
                        hub.window.server_disk_read_mb_s,
                        "MB/s",
                    )
        for level in options.mode.fetch_levels:
            big = table.find(CallsPoint, f"{scenario}_{million}", "dlrhub", concurrency=level)
            small = table.find(CallsPoint, f"{scenario}_10k", "dlrhub", concurrency=level)
            if big and small:
                table.add(
                    f"{scenario}_{million}",
                    f"{short} p99 {million} vs 10k, {level} in flight",
                    big.latency.p99_ms,
                    "ms",
                    small.latency.p99_ms,
                    "<= 1.3",
                    lambda r: r <= 1.3,
                )


def _stream_rows(options: Options, table: _Table) -> None:
    main = options.stream_method.rpartition("/")[2]
    runs = [(main, subscribers) for subscribers in sorted({1, options.subscribers})]
    runs.append(("Stream", options.subscribers))  # the comparison run, if there was one
    for rpc, subscribers in dict.fromkeys(runs):
        echo = table.find(FanoutPoint, "fanout", "echo", subscribers=subscribers)
        hub = table.find(FanoutPoint, "fanout", "dlrhub", subscribers=subscribers, rpc=rpc)
        plural = "s" if subscribers > 1 else ""
        if echo and hub and hub.feed:
            # The target is judged on what the client libraries follow; the other is information.
            judged = rpc == main and subscribers == options.subscribers and subscribers > 1
            table.add(
                "fanout",
                f"{rpc} fan-out, {subscribers} subscriber{plural}, all keeping up",
                hub.messages_per_s,
                "msgs/s",
                echo.messages_per_s,
                ">= 0.7" if judged else "",
                (lambda r: r >= 0.7) if judged else None,
            )
            table.add("fanout", "  at a paced Ingest of", hub.feed.ingest_reports_per_s, "reports/s")
        overload = table.find(FanoutPoint, "fanout_overload", "dlrhub", subscribers=subscribers, rpc=rpc)
        if echo and overload:
            table.add(
                "fanout",
                f"{rpc} fan-out, {subscribers} subscriber{plural}, Ingest flat out",
                overload.messages_per_s,
                "msgs/s",
                echo.messages_per_s,
            )


def _latency_rows(options: Options, table: _Table) -> None:
    for fraction in options.mode.latency_fractions:
        for subscribers in sorted({1, options.subscribers}):
            point = table.find(LatencyPoint, "latency", "dlrhub", subscribers=subscribers, fraction=fraction)
            if not point:
                continue
            share = "half" if fraction == 0.5 else f"{fraction:g} x"
            where = f"{subscribers} sub{'s' if subscribers > 1 else ''} @ {share} peak"
            table.add("latency", f"Ingest offered, {where}", point.offered_per_s, "calls/s")
            table.add("latency", f"Ingest achieved, {where}", point.ingest_calls_per_s, "calls/s")
            table.add("latency", f"ack->subscriber p50, {where}", point.ack_to_subscriber.p50_ms, "ms")
            judged = fraction == 0.5
            table.add(
                "latency",
                f"ack->subscriber p99, {where}",
                point.ack_to_subscriber.p99_ms,
                "ms",
                None,
                "<= 10 ms" if judged else "",
                (lambda v: v <= 10) if judged else None,
                on_value=True,
            )


# The tables.


def format_table(rows: Sequence[Row], title: str) -> str:
    header = ("measure", "value", "ceiling", "ratio", "target", "result")
    body: list[tuple[str, ...]] = []
    for r in rows:
        ceiling = _fmt(r.ceiling, r.unit) if r.ceiling is not None else ""
        ratio = "" if math.isnan(r.ratio) else f"{r.ratio:.2f}"
        result = {True: "PASS", False: "FAIL", None: ""}[r.ok]
        body.append((r.measure, _fmt(r.value, r.unit), ceiling, ratio, r.target, result))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:4], widths[1:4], strict=True)]
        cells += [line[4].ljust(widths[4]), line[5]]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def comparison(tables: Sequence[tuple[str, Sequence[Row]]]) -> str:
    """dlrhub and echo figures side by side, one column per event loop (of (event loop, rows))."""
    names = [row.measure for row in tables[0][1]]
    by_loop = [{row.measure: row for row in rows} for _, rows in tables]
    header = ["measure", *(loop for loop, _ in tables), *(f"{loop} ceiling" for loop, _ in tables)]
    lines: list[list[str]] = []
    for name in names:
        found = [rows.get(name) for rows in by_loop]
        cells = [name]
        cells += [_fmt(row.value, row.unit) if row else "-" for row in found]
        cells += [_fmt(row.ceiling, row.unit) if row and row.ceiling is not None else "" for row in found]
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


def _fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    if unit == "MB/s":
        return f"{value:.1f} MB/s"
    if unit == "us":
        return f"{value:.1f} us"
    return f"{value:,.0f} {unit}"


# The run's beginning and end.


def environment() -> Environment:
    import google.protobuf  # noqa: PLC0415
    from google.protobuf.internal import api_implementation  # noqa: PLC0415

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    return Environment(
        commit=git("rev-parse", "--short", "HEAD").strip(),
        dirty_server_files=[
            line[3:] for line in git("status", "--porcelain", "--", "server").splitlines() if line.strip()
        ],
        python=platform.python_version(),
        grpcio=grpc.__version__,
        protobuf=f"{google.protobuf.__version__} ({api_implementation.Type()})",
        cpus=os.cpu_count(),
        platform=platform.platform(),
    )


def heading(options: Options, env: Environment) -> str:
    return (
        f"dlrhub bench (commit {env.commit}{', server/ modified' if env.dirty_server_files else ''}), "
        f"mode {options.mode.name}, event loop(s) {', '.join(options.loops)}; "
        f"Python {env.python}, grpcio {env.grpcio}, protobuf {env.protobuf}, {env.cpus} CPUs"
    )


def conclude(
    options: Options, env: Environment, suites: Sequence[SuiteResult], stamp: str, elapsed: float
) -> None:
    """Prints the table of each suite, writes the JSON results and the plot, and says where."""
    tables = [(suite.event_loop, rows(options, suite)) for suite in suites]
    for loop, table in tables:
        print()
        print(format_table(table, f"dlrhub vs echo ceiling — {loop}, mode {options.mode.name}"))
    if not options.mode.million:
        print(f"(Fetch and RSS with {options.million:,} stored: run with --full)")
    if len(tables) > 1:
        print()
        print(comparison(tables))
    document = {
        "stamp": stamp,
        "mode": asdict(options.mode),
        "options": {key: value for key, value in asdict(options).items() if key != "mode"},
        "environment": asdict(env),
        "elapsed_s": elapsed,
        "suites": [
            {
                "event_loop": suite.event_loop,
                "stream_message_bytes": suite.stream_message_bytes,
                "rows": [asdict(row) for row in table],
                "points": [asdict(point) for point in suite.points],
                "rss_kib": suite.rss_kib,
                "profiles": [asdict(profile) for profile in suite.profiles],
            }
            for suite, (_, table) in zip(suites, tables, strict=True)
        ],
    }
    json_path = RESULTS / f"{stamp}.json"
    json_path.write_text(json.dumps(_jsonable(document), indent=2, allow_nan=False) + "\n")
    png_path = _plot(suites, f"dlrhub bench {stamp} ({options.mode.name})", RESULTS / f"{stamp}.png")
    print()
    plotted = f", plot: {png_path.relative_to(ROOT)}" if png_path else ""
    print(f"figures: {json_path.relative_to(ROOT)}{plotted}")
    print(f"took {elapsed:.0f} s")


def _plot(suites: Sequence[SuiteResult], title: str, path: Path) -> Path | None:
    """The plot (bench/plot.py), where matplotlib (the bench extra) is installed; its path."""
    try:
        from bench.plot import plot  # noqa: PLC0415
    except ImportError as error:
        print(f"no plot: {error} (pip install -e '.[bench]')")
        return None
    plot(suites, title, path)
    return path


def _jsonable(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, tuples lists, sets sorted lists, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(item) for item in value)
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)
