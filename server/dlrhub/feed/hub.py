"""Live fan-out of committed changes to Stream subscribers.

The hub keeps one window of the newest committed changes, each encoded once (feed/encoding.py), and
every subscriber reads that window at its own position. A change leaves the window as soon as every
subscriber has read past it, or when the window holds more than its budget: `max_bytes` of encoded
changes or `capacity` changes. A subscriber whose next change left that way is marked as overflowed
and catches up from the store (see follow.py). So publishing never waits, a slow consumer costs Ingest
nothing and loses nothing, and the feed's memory is the window's, however many subscribers there are
and however large the reports.

One publisher, in cursor order: with one process writing the store (SQLite), the committer
(write/committer.py) publishes each group right after its commit (one writer thread: commit order is
cursor order); with several processes writing one database (Store.shared), the follower
(feed/follower.py) publishes what it reads back from the store, local and remote changes alike. Either
way `latest_cursor` is a position up to which every readable change has been published, and a
subscriber that has read the store up to a cursor finds every later change in the window (follow.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterable

from dlrhub.feed.encoding import EncodedChange
from dlrhub.store.base import PLAIN_CURSORS, Change, ChangeFilter, CursorFormat

_ids = itertools.count(1)

DEFAULT_CAPACITY = 8192
DEFAULT_MAX_BYTES = 16 << 20


class Subscription:
    """One subscriber: its filter and its position in the hub's window."""

    def __init__(self, hub: Hub, change_filter: ChangeFilter) -> None:
        self.filter = change_filter
        # Changes it was to read have left the window: it must catch up from the store.
        self.overflowed = False
        self.closed = False
        # The cursor the subscriber has been given everything up to (for lag metrics).
        self.position = 0
        self.id = next(_ids)
        self._hub = hub
        # The window index of the next change it reads (set by the hub; meaningless while overflowed).
        self.next = 0
        self._wakeup = asyncio.Event()

    @property
    def ready(self) -> bool:
        """There is something to do: changes to read, a catch-up, or the end."""
        return self.overflowed or self.closed or self.next < self._hub.end

    def take(self, after: int, limit: int, max_bytes: int) -> list[EncodedChange]:
        """The next changes of the window that match the filter and have cursor > `after`: up to
        `limit` of them and `max_bytes` encoded (at least one); read past, so the window can let
        them go. Empty once overflowed."""
        return self._hub.take(self, after, limit, max_bytes)

    async def wait(self, seconds: float) -> bool:
        """Waits until there is something to do; False on timeout."""
        if self.ready:
            return True
        self._wakeup.clear()
        try:
            async with asyncio.timeout(seconds):  # no task per wait, unlike wait_for (once per change)
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    def wake(self) -> None:
        self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()


class Hub:
    """Publishes committed changes, in cursor order, to every subscription."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        max_bytes: int = DEFAULT_MAX_BYTES,
        latest_cursor: int = 0,
        cursors: CursorFormat = PLAIN_CURSORS,
    ) -> None:
        self.capacity = capacity
        # How the store writes cursors (the encoded changes carry them).
        self.cursors = cursors
        self.max_bytes = max_bytes
        # The greatest cursor published so far.
        self.latest_cursor = latest_cursor
        # The window: changes by index, from `first` to `end` (exclusive); indexes are never reused.
        self._window: dict[int, EncodedChange] = {}
        self.first = 0
        self.end = 0
        # The encoded bytes in the window (a plain integer: /metrics reads it from another thread).
        self.buffered_bytes = 0
        # How many live (not overflowed) subscriptions read next at each index: a change can leave
        # the window once no subscription's next index is at or before it.
        self._readers: dict[int, int] = {}
        self._subscriptions: set[Subscription] = set()
        # Times any subscriber fell out of the window, since start: one integer, so a reader on
        # another thread (/metrics) sees it only grow.
        self.overflows = 0
        # Shutting down: subscriptions end, and new ones start ended.
        self.closed = False
        # Publishes what is committed but not yet published, when changes reach the hub by being read
        # back from the store (the follower, feed/follower.py): a Stream from "now" calls it first, so
        # that "now" includes what was acknowledged before it began. None: the hub is always current.
        self.refresh: Callable[[], Awaitable[None]] | None = None

    def subscribe(self, change_filter: ChangeFilter) -> Subscription:
        """A subscription that reads every change published from now on."""
        subscription = Subscription(self, change_filter)
        self._subscriptions.add(subscription)
        self._join(subscription)
        if self.closed:
            subscription.close()
        return subscription

    def resume(self, subscription: Subscription) -> None:
        """An overflowed subscription reads live again, every change published from now on (the
        caller catches up from the store on what it missed)."""
        if subscription.overflowed:
            subscription.overflowed = False
            self._join(subscription)

    def catch_up_all(self) -> None:
        """Every live subscription catches up from the store (as if overflowed): the publisher may
        have missed changes that the store now tells of (a prune ahead of the follower)."""
        for subscription in self._subscriptions:
            if not subscription.overflowed:
                subscription.overflowed = True
                self._leave(subscription.next)
                subscription.wake()

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.discard(subscription)
            if not subscription.overflowed:
                self._leave(subscription.next)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)

    @property
    def buffered_changes(self) -> int:
        return self.end - self.first

    def publish(self, changes: Iterable[Change]) -> None:
        """Call only after the changes are committed, in cursor order."""
        if not self._readers:  # nobody reads live: nothing to keep (a new subscription starts after)
            for change in changes:
                self.latest_cursor = change.cursor
            return
        for change in changes:
            encoded = EncodedChange(change, self.cursors)
            self._window[self.end] = encoded
            self.end += 1
            self.buffered_bytes += encoded.size
            self.latest_cursor = change.cursor
        self._keep_within_budget()
        for subscription in self._subscriptions:
            subscription.wake()

    def take(self, subscription: Subscription, after: int, limit: int, max_bytes: int) -> list[EncodedChange]:
        """See Subscription.take."""
        if subscription.overflowed:
            return []
        ready: list[EncodedChange] = []
        size = 0
        index = subscription.next
        matches = subscription.filter.matches
        while index < self.end and len(ready) < limit:
            encoded = self._window[index]
            if encoded.cursor > after and matches(encoded.change):
                if ready and size + encoded.size > max_bytes:
                    break
                ready.append(encoded)
                size += encoded.size
            index += 1
        if index != subscription.next:
            self._readers[index] = self._readers.get(index, 0) + 1  # before leaving: see _release
            self._leave(subscription.next)
            subscription.next = index
        return ready

    def close(self) -> None:
        """Ends every subscription, and any made from now on (at shutdown)."""
        self.closed = True
        for subscription in self._subscriptions:
            subscription.close()

    def _join(self, subscription: Subscription) -> None:
        subscription.next = self.end
        self._readers[self.end] = self._readers.get(self.end, 0) + 1

    def _leave(self, index: int) -> None:
        count = self._readers[index] - 1
        if count:
            self._readers[index] = count
        else:
            del self._readers[index]
            self._release()

    def _release(self) -> None:
        """Lets go of the oldest changes that no subscription has still to read."""
        while self.first < self.end and self.first not in self._readers:
            self._drop()

    def _drop(self) -> None:
        self.buffered_bytes -= self._window.pop(self.first).size
        self.first += 1

    def _keep_within_budget(self) -> None:
        """Drops the oldest changes while the window is over its budget; their readers overflow."""
        overflowed = False
        while self.first < self.end and (
            self.buffered_bytes > self.max_bytes or self.end - self.first > self.capacity
        ):
            overflowed |= self._readers.pop(self.first, 0) > 0
            self._drop()
        if overflowed:
            for subscription in self._subscriptions:
                if not subscription.overflowed and subscription.next < self.first:
                    subscription.overflowed = True
                    self.overflows += 1
        self._release()
