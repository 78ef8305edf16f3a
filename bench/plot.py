"""The PNG of a bench run: throughput and latency against load (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

from bench.records import CallsPoint, FanoutPoint, LatencyPoint, SuiteResult

_STYLES = {"asyncio": "-", "uvloop": "--"}


def plot(suites: Sequence[SuiteResult], title: str, path: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(14, 10))
    throughput, latency, streams, stream_latency = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    bars: dict[str, dict[str, float]] = {}
    latency_bars: dict[str, dict[str, float]] = {}
    colors: dict[str, str] = {}
    for suite in suites:
        _curves(suite, throughput, latency, colors)
        _bars(suite, bars, latency_bars)
    throughput.set(title="unary throughput vs calls in flight", xlabel="calls in flight", ylabel="calls/s")
    throughput.set_xscale("log", base=2)
    latency.set(title="unary latency vs calls in flight", xlabel="calls in flight", ylabel="ms")
    latency.set_xscale("log", base=2)
    latency.set_yscale("log")
    for axis in (throughput, latency):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    _grouped_bars(
        streams, bars, "batched Ingest (reports/s) and fan-out (changes/s) vs echo (msgs/s)", "per second"
    )
    _grouped_bars(stream_latency, latency_bars, "Ingest ack -> subscriber latency", "ms")
    stream_latency.axhline(10, color="red", linewidth=0.8, linestyle="--", label="target p99 10 ms")
    stream_latency.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _curves(suite: SuiteResult, throughput: Any, latency: Any, colors: dict[str, str]) -> None:
    """Calls/s and p50/p99 against calls in flight, one line per server and payload."""
    loop = suite.event_loop
    style = _STYLES.get(loop, "-")
    curves: dict[str, list[tuple[int, float, float, float]]] = {}
    for point in suite.points:
        batches = ("client_stream", "batched", "webhook_batch")  # one point each: in the bars, or nowhere
        if not isinstance(point, CallsPoint) or point.scenario in batches:
            continue
        name = f"{point.target} {point.scenario}".replace("dlrhub unary", "dlrhub Ingest")
        name = name.replace("echo unary", "echo (Ingest bytes)").replace(
            "echo fetch_echo", "echo (Fetch bytes)"
        )
        name = name.replace("dlrhub fetch_", "dlrhub Fetch ")
        curves.setdefault(name, []).append(
            (point.concurrency, point.calls_per_s, _ms(point.latency.p50_ms), _ms(point.latency.p99_ms))
        )
    for name, values in sorted(curves.items()):
        values.sort()
        levels = [v[0] for v in values]
        label = f"{name} ({loop})"
        color = colors.setdefault(name, f"C{len(colors)}")  # one colour per series, whatever the loop
        throughput.plot(levels, [v[1] for v in values], style, marker="o", color=color, label=label)
        latency.plot(levels, [v[3] for v in values], style, marker="o", color=color, label=f"{label} p99")
        latency.plot(levels, [v[2] for v in values], ":", marker=".", color=color, label=f"{label} p50")


def _bars(
    suite: SuiteResult, bars: dict[str, dict[str, float]], latency: dict[str, dict[str, float]]
) -> None:
    """Batched Ingest, fan-out and ack -> subscriber latency, one group per event loop."""
    loop = suite.event_loop
    names = {"StreamBatches": "dlrhub\nbatches", "Stream": "dlrhub\nStream"}
    for point in suite.points:
        if isinstance(point, CallsPoint) and point.scenario == "client_stream":
            bars.setdefault(loop, {})["client-stream\necho"] = point.items_per_s
        elif isinstance(point, CallsPoint) and point.scenario == "batched":
            bars.setdefault(loop, {})[f"batched Ingest\n({point.batch}/call)"] = point.items_per_s
        elif isinstance(point, FanoutPoint) and point.scenario == "fanout":
            target = names.get(point.rpc, "dlrhub") if point.target == "dlrhub" else "echo"
            bars.setdefault(loop, {})[f"fan-out {point.subscribers}\n{target}"] = point.messages_per_s
        elif isinstance(point, LatencyPoint):
            where = f"{point.subscribers} sub\n@ {point.fraction:g} x peak"
            latency.setdefault(f"{loop} p50", {})[where] = _ms(point.ack_to_subscriber.p50_ms)
            latency.setdefault(f"{loop} p99", {})[where] = _ms(point.ack_to_subscriber.p99_ms)


def _ms(value: float) -> float:
    """A latency to draw: 0 where there was none (NaN)."""
    return value if math.isfinite(value) else 0.0


def _grouped_bars(axis: Any, groups: dict[str, dict[str, float]], title: str, unit: str) -> None:
    keys = sorted({key for values in groups.values() for key in values})
    width = 0.8 / max(1, len(groups))
    for index, (name, values) in enumerate(groups.items()):
        positions = [k + index * width for k in range(len(keys))]
        axis.bar(positions, [values.get(key, 0) for key in keys], width, label=name)
    axis.set_xticks([k + width * (len(groups) - 1) / 2 for k in range(len(keys))], keys, fontsize=7)
    axis.set(title=title, ylabel=unit)
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize=8)
