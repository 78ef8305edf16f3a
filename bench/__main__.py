"""dlrhub end-to-end benchmark against an echo ceiling on the same gRPC stack, in one run.

    python -m bench [--quick | --full] [--event-loop asyncio|uvloop|both] [--profile]

Starts `dlrhub serve` (its real settings: WAL, synchronous=FULL, group commit; only the addresses
and the database file are set) and bench/echo_server.py (a grpc.aio server with dlrhub's own
server options and identity serializers), drives both from separate load processes
(bench/load.py), and measures, with the echo figure of the same run as the ceiling:

  unary Ingest (one report per call)       vs unary echo of the same bytes, at several concurrencies
  batched Ingest (100 reports per call)    vs client-streaming echo, in reports (messages) per second
  Fetch by message id, 10k (and 1M) stored vs unary echo of the same request bytes
  Fetch with history, 10k (and 1M) stored  the same, with include_history
  write cost of a hot message's report     in process, 10,000 vs 500 reports of history
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
import sys
import time

from bench import report, suite
from bench.common import RESULTS, SERVICE
from bench.options import MODES, PHASES, Options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = report.environment()
    print(report.heading(options, env), flush=True)
    started = time.monotonic()
    suites = suite.run(options, stamp)
    report.conclude(options, env, suites, stamp, time.monotonic() - started)
    return 0


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
    loops = ("asyncio", "uvloop") if options.event_loop == "both" else (options.event_loop,)
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


if __name__ == "__main__":
    sys.exit(main())
