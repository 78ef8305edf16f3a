"""Group commit's bounds: a group takes what is waiting, up to `max_group` submissions and while they
hold up to `max_group_items` items (PostgreSQL numbers a transaction's reports in a bounded space)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.feed.hub import Hub
from dlrhub.normalise import Normaliser
from dlrhub.store import SqliteStore
from dlrhub.store.base import Transaction
from dlrhub.write.committer import Committer
from dlrhub.write.writer import Writer
from tests.conftest import FakeClock
from tests.helpers import ACCEPTED, TIMEOUT, eventually, gms_batch


async def test_a_group_holds_at_most_max_group_items(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "dlrhub.db")
    groups: list[int] = []
    committer = Committer(store, Hub(), max_group_items=250, on_commit=lambda _, items: groups.append(items))
    committer.start()
    writer = Writer(Normaliser.load(), committer, FakeClock())
    release = threading.Event()

    def hold(tx: Transaction) -> None:  # the writer thread is busy: what is submitted waits
        assert release.wait(TIMEOUT)

    held = asyncio.create_task(committer.run(hold))
    # A first call is taken as a group at once, and waits behind `hold`; the next ones queue.
    first = asyncio.create_task(writer.ingest(gms_batch("first"), Format.FORMAT_GMS))
    await eventually(lambda: writer.budget.used > 0 and committer.waiting == 0, "the first call taken")
    sizes = [100] * 6 + [300]
    payloads = [gms_batch(*(f"m-{call}-{n}" for n in range(size))) for call, size in enumerate(sizes)]
    calls = [asyncio.create_task(writer.ingest(payload, Format.FORMAT_GMS)) for payload in payloads]
    try:
        await eventually(lambda: committer.waiting == len(calls), "every call queued")
        release.set()
        await held
        answers = await asyncio.gather(first, *calls)
        assert all(result.outcome == ACCEPTED for answer in answers for result in answer.response.results)
        # In order, each group as full as 250 items allow; one call larger than that goes alone.
        assert groups == [1, 200, 200, 200, 300]
    finally:
        release.set()
        await committer.stop()
        store.close()
