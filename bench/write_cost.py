"""The write path's cost per new report of a hot message, against the length of its history (#19.2).

In process, on a real SQLite file (WAL, synchronous=FULL): two messages get a history of 500 and
10,000 reports through `dlrhub.write.submission.apply`, what the committer runs; then each round
applies a group of new reports of one of them (as one group commit of single-report Ingests) inside
a transaction that is rolled back, so the history keeps its length and every round does the same
work. The two messages' rounds alternate; each figure is the median of the rounds. No gRPC: this is
what a hot message adds to the writer thread, which every Ingest waits on.

    python -m bench --quick --only hot
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from bench.common import gms_batch, gms_report
from bench.records import WriteCostPoint
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.normalise import Normaliser
from dlrhub.store import SqliteStore, Store, Transaction
from dlrhub.write.submission import Submission, apply

HISTORIES = (500, 10_000)  # reports of history of the two messages
GROUP = 100  # new reports per round
ROUNDS = 15
_SEED_BATCH = 1000
_NEW = 10**8  # report indexes of the new reports (the seeded ones count from 0)


class _RollBack(Exception):
    pass


def measure(workdir: Path, rounds: int = ROUNDS) -> list[WriteCostPoint]:
    """One point per history length: the median cost of applying a new report of that message."""
    normaliser = Normaliser.load()
    received = Timestamp()
    received.GetCurrentTime()
    path = workdir / "write-cost.db"
    store = SqliteStore(path)
    try:
        groups = {}
        seeded = 0
        for history in HISTORIES:
            message_id = f"hot-{history}"
            for first in range(seeded, seeded + history, _SEED_BATCH):
                count = min(_SEED_BATCH, seeded + history - first)
                payload = gms_batch([message_id] * count, first)
                _commit(
                    store, [Submission(normaliser.normalise(payload, Format.FORMAT_GMS, received), received)]
                )
            seeded += history
            groups[history] = [
                Submission(
                    normaliser.normalise(gms_report(message_id, _NEW + n), Format.FORMAT_GMS, received),
                    received,
                )
                for n in range(GROUP)
            ]
        timings: dict[int, list[float]] = {history: [] for history in HISTORIES}
        for _ in range(rounds):
            for history, submissions in groups.items():
                timings[history].append(_applied_and_rolled_back(store, submissions) / GROUP * 1e6)
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return [
        WriteCostPoint(
            history=history,
            group=GROUP,
            per_report_us=statistics.median(values),
            rounds_us=tuple(values),
        )
        for history, values in timings.items()
    ]


def _commit(store: Store, submissions: Sequence[Submission]) -> None:
    with store.transaction() as tx:
        _apply_new(tx, submissions)


def _applied_and_rolled_back(store: Store, submissions: Sequence[Submission]) -> float:
    """Seconds `apply` took for the submissions, in a transaction that is then rolled back."""
    try:
        with store.transaction() as tx:
            started = time.perf_counter()
            _apply_new(tx, submissions)
            elapsed = time.perf_counter() - started
            raise _RollBack
    except _RollBack:
        pass
    return elapsed


def _apply_new(tx: Transaction, submissions: Sequence[Submission]) -> None:
    """Applies submissions of new reports (all of them must be accepted)."""
    accepted = sum(applied.response.accepted_count for applied in apply(tx, submissions))
    if accepted != sum(len(submission.items) for submission in submissions):
        raise RuntimeError("write cost: a report was not accepted")
