"""What the bench, the load processes and the preloader share: payloads, ids, /proc figures, paths."""

from __future__ import annotations

import hashlib
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"

SERVICE = "/deliveryreport.v1.DeliveryReportService/"
INGEST = SERVICE + "Ingest"
FETCH = SERVICE + "GetMessage"  # the "Fetch by id" measures: GetMessage since the v1 cleanup
STREAM = SERVICE + "Stream"
STREAM_BATCHES = SERVICE + "StreamBatches"
ECHO_UNARY = "/bench.Echo/Unary"
ECHO_CLIENT_STREAM = "/bench.Echo/ClientStream"
ECHO_SERVER_STREAM = "/bench.Echo/ServerStream"

# One GMS report, as a provider posts it (the shape of tests/fixtures/gms_batch.json items).
GMS_TEMPLATE = (
    '{"number": %d, "time": %d, "status": 2, "substatus": 23, "hyber_status": 23011, '
    '"message_id": "%s", "extra_id": "AD-%d", "sent_via": "sms", '
    '"total_sms_parts": 1, "delivered_sms_parts": 1}'
)
BASE_TIME_MS = 1_700_000_000_000

# Client channels: no retries or proxies in the way; the same options for dlrhub and the echo server.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def gms_report(message_id: str, index: int) -> str:
    """One GMS report's JSON text."""
    return GMS_TEMPLATE % (380_960_000_000 + index % 10_000_000, BASE_TIME_MS + index, message_id, index)


def gms_batch(message_ids: Sequence[str], first_index: int) -> str:
    """A GMS batch (a JSON array) of one report per message id."""
    return "[" + ",".join(gms_report(mid, first_index + n) for n, mid in enumerate(message_ids)) + "]"


def stored_id(index: int) -> str:
    """The message id of the index-th report of a preloaded database: UUID-shaped and spread out
    (like provider ids), and computable by any process without reading the database."""
    digest = hashlib.blake2b(index.to_bytes(8, "big"), digest_size=16, person=b"dlrhub-bench").digest()
    return str(uuid.UUID(bytes=digest, version=4))


def live_id(tag: str, worker: int, seq: int) -> str:
    """A fresh message id for live ingest load: unique per (run tag, worker, sequence)."""
    return f"{tag}-{worker:04x}-4000-8000-{seq:012x}"


def proc_status(pid: int) -> dict[str, int]:
    """Memory figures of a process from /proc/PID/status, in KiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    figures: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return figures
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            figures[name] = int(value.split()[0])
    return figures


def proc_read_bytes(pid: int) -> int:
    """Bytes a process has had read from the block device (page-cache misses), from /proc/PID/io."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "read_bytes":
                return int(value)
    except OSError:
        pass
    return 0


def warm_page_cache(path: Path) -> float:
    """Reads a file once so that its pages are in the OS page cache; the seconds it took."""
    started = time.monotonic()
    with path.open("rb") as file:
        while file.read(8 * 1024 * 1024):
            pass
    return time.monotonic() - started


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")
