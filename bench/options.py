"""What a run measures: the mode (windows, levels) and the options of the command line."""

from __future__ import annotations

from dataclasses import dataclass

from bench.common import STREAM_BATCHES


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

PHASES = frozenset(
    {"unary", "batched", "webhook", "fanout", "latency", "fetch", "history", "hot", "postgres"}
)
# The phases that load a dlrhub server with Ingest.
INGEST_PHASES = frozenset({"unary", "batched", "webhook", "fanout", "latency"})


@dataclass(frozen=True)
class Options:
    mode: Mode
    loops: tuple[str, ...]  # event loops, one suite each: asyncio, uvloop
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
