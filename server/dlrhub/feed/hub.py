"""Live fan-out of committed changes to Stream subscribers.

Each subscriber has a bounded buffer of the changes that match its filter.
Publishing never waits: a subscriber whose buffer is full is marked as
overflowed and its buffer dropped, and the subscriber catches up from the
store (see follow.py). So a slow consumer costs Ingest nothing and loses
nothing.

Single writer: the hub assumes that every change in the store is committed by
this process's committer (write/committer.py), which publishes each group
right after its commit, in cursor order (one writer thread: commit order is
cursor order). So `latest_cursor` is the store's,
and a subscriber that has read the store up to a cursor finds every later
change in its buffer. A change committed by another process is never
published here (the SQLite store refuses a second process on its file): with
several processes writing one database, live changes
must come from the store itself (a notification, or reading `Store.changes`
after the latest cursor seen), and this assumption is what that work
replaces.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable

from dlrhub.store.base import Change, ChangeFilter

_ids = itertools.count(1)


class Subscription:
    """One subscriber's bounded buffer."""

    def __init__(self, change_filter: ChangeFilter, capacity: int) -> None:
        self.filter = change_filter
        self.capacity = capacity
        self.buffer: deque[Change] = deque()
        self.overflowed = False
        self.closed = False
        # The cursor the subscriber has been given everything up to (for lag metrics).
        self.position = 0
        self.id = next(_ids)
        self._wakeup = asyncio.Event()

    def offer(self, change: Change) -> bool:
        """Buffers a change if it matches; True if the buffer overflowed with it."""
        if self.overflowed or not self.filter.matches(change):
            return False
        if len(self.buffer) >= self.capacity:
            self.overflowed = True
            self.buffer.clear()
        else:
            self.buffer.append(change)
        self._wakeup.set()
        return self.overflowed

    async def wait(self, seconds: float) -> bool:
        """Waits until there is something to do; False on timeout."""
        if self.buffer or self.overflowed or self.closed:
            return True
        self._wakeup.clear()
        try:
            async with asyncio.timeout(seconds):  # no task per wait, unlike wait_for (once per change)
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()


class Hub:
    """Publishes committed changes, in cursor order, to every subscription."""

    def __init__(self, capacity: int = 8192, latest_cursor: int = 0) -> None:
        self.capacity = capacity
        # The greatest cursor published so far.
        self.latest_cursor = latest_cursor
        self._subscriptions: set[Subscription] = set()
        # Times any subscriber's buffer overflowed, since start: one integer, so a reader on another
        # thread (/metrics) sees it only grow.
        self.overflows = 0
        # Shutting down: subscriptions end, and new ones start ended.
        self.closed = False

    def subscribe(self, change_filter: ChangeFilter) -> Subscription:
        subscription = Subscription(change_filter, self.capacity)
        self._subscriptions.add(subscription)
        if self.closed:
            subscription.close()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)

    def publish(self, changes: Iterable[Change]) -> None:
        """Call only after the changes are committed, in cursor order."""
        for change in changes:
            for subscription in self._subscriptions:
                if subscription.offer(change):
                    self.overflows += 1
            self.latest_cursor = change.cursor

    def close(self) -> None:
        """Ends every subscription, and any made from now on (at shutdown)."""
        self.closed = True
        for subscription in self._subscriptions:
            subscription.close()
