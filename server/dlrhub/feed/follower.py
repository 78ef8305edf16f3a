"""The follower: this process's one reader of a shared history, feeding the hub.

When several processes write one database (`Store.shared`), a change committed by any of them reaches
this process's Stream subscribers through here: one task reads `Store.changes(after=followed)` on a
thread of its own and publishes what it reads to the hub, in cursor order, so local and remote
commits reach subscribers the same way (the hub's single-writer assumption holds: the follower is
its one publisher). It reads when woken:

- by the local committer after each commit (`wake`, an in-process event, no database round trip);
- by the store telling of other processes' commits (`Store.wait_changes`, on a listener thread);
- every `poll_seconds` in any case: a notification can be lost (the listener reconnecting), and a
  change becomes readable only once every older transaction has ended, which nobody announces.

Wake-ups coalesce: one read drains everything readable. A store that cannot be read is retried with
backoff; subscribers wait meanwhile and carry on from where the follower was.

Lag: at most once a poll interval (woken or not) the follower also asks for the greatest committed
cursor (`newest`), and remembers when it first saw each one it had not published yet; `lag_seconds`
is the age of the oldest such sighting, 0 when it has published everything it has seen committed
(dlrhub_stream_lag_seconds). A long transaction anywhere on the database holds back what `changes`
may return, and shows here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from dlrhub.feed.follow import changes_and_pruned
from dlrhub.feed.hub import Hub
from dlrhub.store.base import Store, StoreError

log = logging.getLogger(__name__)

# Seconds between reads when nothing wakes the follower.
POLL_SECONDS = 0.2
# Changes read at a time.
BATCH = 500
# Seconds to wait after a failed read or listen, doubled after each failure up to the last.
BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Follower:
    """Publishes the store's changes to the hub as they become readable (see the module's text)."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        *,
        newest: Callable[[], int] | None = None,
        poll_seconds: float = POLL_SECONDS,
        batch: int = BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._hub = hub
        # The greatest committed cursor, readable or not yet (for the lag); None: no lag measured.
        self._newest = newest
        self.poll_seconds = poll_seconds
        self._batch = batch
        self._clock = clock
        # The cursor published up to: every readable change at or below it is in the hub.
        self.followed = hub.latest_cursor
        # Committed cursors seen above `followed`, with when each was first seen (for the lag).
        self._unpublished: collections.deque[tuple[int, float]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlrhub-follower")
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        # One drain at a time: the task's, or a Stream's (`refresh`).
        self._draining = asyncio.Lock()
        self._sampled = -poll_seconds  # when `newest` was last asked, on the event loop's clock
        # The store's pruned-through position as last read (Store.pruned_through).
        self._pruned = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="dlrhub-follower")
        self._listener = threading.Thread(
            target=self._listen, args=(loop,), name="dlrhub-listener", daemon=True
        )
        self._listener.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._listener is not None:  # it returns within a poll: wait_changes times out
            await asyncio.get_running_loop().run_in_executor(None, self._listener.join)
            self._listener = None
        self._reader.shutdown(wait=True)

    def wake(self) -> None:
        """Something was committed: read now (on the event loop)."""
        self._wakeup.set()

    @property
    def lag_seconds(self) -> float:
        """How long the oldest committed change not yet published has been seen waiting."""
        if not self._unpublished:
            return 0.0
        return max(0.0, self._clock() - self._unpublished[0][1])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()  # a wake-up from now on is another read
            try:
                if self._newest is not None and loop.time() - self._sampled >= self.poll_seconds:
                    self._sampled = loop.time()
                    self._saw(await loop.run_in_executor(self._reader, self._newest))
                async with self._draining:
                    await self.drain()
            except StoreError as error:
                delay = BACKOFF[min(self._failures, len(BACKOFF) - 1)]
                self._failures += 1
                log.warning(
                    "cannot read the store's changes: retrying in %g s", delay, extra={"reason": str(error)}
                )
                await asyncio.sleep(delay)
                continue
            if self._failures:
                self._failures = 0
                log.warning("reading the store's changes again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await self._wakeup.wait()

    async def refresh(self) -> None:
        """Publishes every change readable now (Hub.refresh); a store that cannot be read leaves the
        hub as it is (the follower's task retries)."""
        async with self._draining:
            with contextlib.suppress(StoreError):
                await self.drain()

    async def drain(self) -> None:
        """Reads and publishes every readable change after `followed`. Raises StoreError."""
        loop = asyncio.get_running_loop()
        while True:
            after = self.followed
            read = functools.partial(changes_and_pruned, self._store, after, self._batch)
            batch, pruned = await loop.run_in_executor(self._reader, read)
            if batch:
                self.followed = batch[-1].cursor
                self._hub.publish(batch)
                while self._unpublished and self._unpublished[0][0] <= self.followed:
                    self._unpublished.popleft()
            if pruned > after and pruned > self._pruned:
                # A prune (on any replica) deleted changes before they were read here (this process
                # was slow to read, or cut off from the database): they never reach the hub, so
                # subscribers catch up from the store, which ends each feed they were missing from
                # with CursorPruned (follow.py).
                self._hub.catch_up_all()
            self._pruned = max(self._pruned, pruned)
            if len(batch) < self._batch:
                return

    def _saw(self, newest: int) -> None:
        """Notes the greatest committed cursor, when first seen above what is published."""
        if newest > self.followed and (not self._unpublished or newest > self._unpublished[-1][0]):
            self._unpublished.append((newest, self._clock()))

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """The listener thread: wakes the follower whenever the store tells of other commits."""
        failures = 0
        while not self._stopping.is_set():
            try:
                told = self._store.wait_changes(self.poll_seconds)
            except StoreError as error:
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                failures += 1
                log.warning(
                    "cannot listen for other processes' commits: retrying in %g s (polling meanwhile)",
                    delay,
                    extra={"reason": str(error)},
                )
                self._stopping.wait(delay)
                continue
            failures = 0
            if told and not self._stopping.is_set():
                try:
                    loop.call_soon_threadsafe(self.wake)
                except RuntimeError:  # the loop has closed: the app is gone
                    return
