"""Group commit: concurrent submissions share one durable transaction.

Submissions queue up while the writer thread commits the previous group;
the next group takes everything waiting (up to `max_group` submissions, and
while they hold up to `max_group_items` items: an engine numbers a
transaction's reports in a bounded space, see store/postgres.py). Each caller is
answered only after its group has committed durably, and the
group's changes are published to the hub only after that commit. Whether
each group committed is told to `on_outcome` (the store's health).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from dlrhub.feed.hub import Hub
from dlrhub.store.base import Store, StoreError, Transaction
from dlrhub.write.submission import Applied, Submission, apply

log = logging.getLogger(__name__)
T = TypeVar("T")
# Items a group holds at most (unless one submission alone holds more): well below the 2**24
# reports PostgreSQL's positions number per transaction (store/postgres.py).
MAX_GROUP_ITEMS = 1 << 20


def _items(submission: Submission) -> int:
    return len(submission.items) or 1


@dataclass(slots=True)
class _Pending:
    submission: Submission
    future: asyncio.Future[Applied]


class Committer:
    """Applies submissions in groups on one writer thread."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        *,
        max_group: int = 512,
        max_group_items: int = MAX_GROUP_ITEMS,
        max_waiting: int = 10_000,
        on_commit: Callable[[float, int], None] | None = None,
        on_outcome: Callable[[Exception | None], None] | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        # Called after each commit with its duration in seconds and how many items it held.
        self._on_commit = on_commit
        # Called on the event loop after each group: None once it committed, else why it failed.
        self._on_outcome = on_outcome
        self._max_group = max_group
        self._max_group_items = max_group_items
        # A submission taken from the queue that did not fit the group: the next group's first.
        self._carried: _Pending | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue(max_waiting)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlrhub-writer")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dlrhub-committer")

    async def stop(self) -> None:
        """Commits everything already submitted, then stops."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._writer.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        """Submissions queued for the next group (not yet being written)."""
        return self._queue.qsize()

    async def submit(self, submission: Submission) -> Applied:
        """Applies a submission; returns once it is durably committed. Raises StoreError."""
        if self._task is None or self._task.done():
            raise StoreError("the store is not accepting writes")
        future: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(submission, future))
        # A caller cancelled (or past its deadline) while still queued cancels the future, and the
        # writer skips it; once its group is being written, it commits whether or not anyone waits.
        return await future

    async def run(self, work: Callable[[Transaction], T]) -> T:
        """Runs `work` in a transaction of its own on the writer thread, between two groups (for
        upkeep, such as deleting expired rows: keep it short, every Ingest waits for it)."""
        if self._task is None or self._task.done():
            raise StoreError("the store is not accepting writes")

        def transaction() -> T:
            with self._store.transaction() as tx:
                return work(tx)

        return await asyncio.get_running_loop().run_in_executor(self._writer, transaction)

    async def check(self) -> None:
        """Returns if the store can commit now, else raises StoreError: a small durable write, on
        the writer thread between groups."""
        check = functools.partial(self._store.check, write=True)
        await asyncio.get_running_loop().run_in_executor(self._writer, check)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping or self._carried is not None:
            first, self._carried = self._carried or await self._queue.get(), None
            group: list[_Pending] = []
            items = 0
            if first is None:
                stopping = True
            else:
                group.append(first)
                items = _items(first.submission)
            while len(group) < self._max_group and not stopping and not self._queue.empty():
                pending = self._queue.get_nowait()
                if pending is None:
                    stopping = True
                elif items + _items(pending.submission) > self._max_group_items:
                    self._carried = pending
                    break
                else:
                    group.append(pending)
                    items += _items(pending.submission)
            group = [pending for pending in group if not pending.future.cancelled()]
            if not group:
                continue
            try:
                results = await loop.run_in_executor(self._writer, self._write, [p.submission for p in group])
            except Exception as error:
                # One line per failed group: a storm of them (a full disk) is rate-limited by
                # observability.logs.RepeatFilter, and counted in dlrhub_store_failures_total by
                # on_outcome.
                log.exception("commit failed for %d submissions", len(group))
                self._tell(error)
                for pending in group:
                    if not pending.future.done():
                        pending.future.set_exception(StoreError(f"the store could not commit: {error}"))
                continue
            self._tell(None)
            self._hub.publish(change for applied in results for change in applied.changes)
            for pending, applied in zip(group, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(applied)

    def _tell(self, error: Exception | None) -> None:
        if self._on_outcome is not None:
            try:
                self._on_outcome(error)
            except Exception:
                log.exception("commit outcome observer failed")

    def _write(self, submissions: list[Submission]) -> list[Applied]:
        started = time.perf_counter()
        with self._store.transaction() as tx:
            applied = apply(tx, submissions, self._store.cursor_format)
        if self._on_commit is not None:
            try:  # committed already: a failing observer must not turn it into an error
                self._on_commit(time.perf_counter() - started, sum(map(_items, submissions)))
            except Exception:
                log.exception("commit observer failed")
        return applied
