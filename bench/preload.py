"""Databases with N reports stored, built once and cached under bench/.cache/.

Loading a million reports through Ingest would take most of an hour on two cores, so the file is
written through the store API directly: the real Normaliser, `dlrhub.write.submission.apply` and
`SqliteStore.transaction()`, exactly what the committer runs, in transactions of 20,000 reports.
Report i has message id `bench.common.stored_id(i)` (UUID-shaped, spread over the index like
provider ids), so the Fetch load can pick stored ids without reading the file.

    python -m bench.preload 1000000      # prints the path of the cached file
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from bench.common import CACHE, gms_batch, stored_id
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.normalise import Normaliser
from dlrhub.store import SqliteStore
from dlrhub.store.sqlite import SCHEMA_VERSION
from dlrhub.write.submission import Submission, apply

CHUNK = 1000  # reports per normalised payload
TRANSACTION = 20_000  # reports per transaction
FORMAT_VERSION = 1  # bump when the generated content changes


def cached_path(count: int) -> Path:
    return CACHE / f"gms-{count}-schema{SCHEMA_VERSION}-v{FORMAT_VERSION}.db"


def ensure(count: int, *, log: bool = True) -> Path:
    """The cached database with `count` reports; built first if it is not there yet."""
    path = cached_path(count)
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    building = path.with_suffix(".building")
    for stale in (building, *(Path(f"{building}{suffix}") for suffix in ("-wal", "-shm"))):
        stale.unlink(missing_ok=True)
    normaliser = Normaliser.load()
    received = Timestamp()
    started = time.monotonic()
    store = SqliteStore(building)
    try:
        done = 0
        while done < count:
            end = min(count, done + TRANSACTION)
            received.FromNanoseconds(time.time_ns())
            with store.transaction() as tx:
                for first in range(done, end, CHUNK):
                    last = min(end, first + CHUNK)
                    payload = gms_batch([stored_id(i) for i in range(first, last)], first)
                    items = normaliser.normalise(payload, Format.FORMAT_GMS, received)
                    [applied] = apply(tx, [Submission(items, received)])
                    if applied.response.accepted_count != last - first:
                        raise RuntimeError(f"preload: reports {first}..{last} were not all accepted")
            done = end
            if log and (done % 100_000 == 0 or done == count):
                rate = done / (time.monotonic() - started)
                print(f"preload: {done:,}/{count:,} reports ({rate:,.0f}/s)", file=sys.stderr, flush=True)
    finally:
        store.close()  # the last connection checkpoints the WAL into the file and removes it
    Path(f"{building}.lock").unlink()  # the store's one-process lock: no server runs on this file
    building.rename(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for count in args or ["10000"]:
        print(ensure(int(count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
