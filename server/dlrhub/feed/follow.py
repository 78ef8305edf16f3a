"""A Stream subscriber's feed: stored changes after a cursor, then live ones.

No gap and no duplicate: the subscription starts before the store is read,
so every change committed after that moment also arrives live; changes at or
before the last cursor delivered are skipped. When the subscriber's buffer
overflows (a slow consumer), it catches up from the store again.

The first item is always a heartbeat with the start position, sent as soon
as the subscription is live, so a caller knows from when changes are covered
and has a cursor to resume from even if nothing matches.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dlrhub.feed.hub import Hub
from dlrhub.store.base import Change, ChangeFilter, ReadRunner, Store

# Changes read from the store at a time, and yielded together at most.
MAX_BATCH = 500


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing matched for a while; `cursor` is the latest position (safe to resume after)."""

    cursor: int


async def follow_batches(
    store: Store,
    hub: Hub,
    read: ReadRunner,
    change_filter: ChangeFilter,
    after: int | None,
    heartbeat_seconds: float,
    max_batch: int = MAX_BATCH,
) -> AsyncIterator[list[Change] | Heartbeat]:
    """Changes matching the filter with cursor > `after` (None: only changes from now on), those
    that are ready at the same moment together (never empty, at most `max_batch`): a subscriber that
    sends them in one message keeps up with far more."""
    subscription = hub.subscribe(change_filter)
    try:
        subscription.position = last = hub.latest_cursor if after is None else after
        # The stream is live from here on: say so at once, with the position it starts after.
        yield Heartbeat(last)
        catch_up = True
        while not subscription.closed:
            if catch_up or subscription.overflowed:
                subscription.overflowed = False
                catch_up = False
                while not subscription.closed:  # a long replay stops at shutdown too
                    batch = await read(functools.partial(store.changes, last, max_batch))
                    if not batch:
                        break
                    matched = [change for change in batch if change_filter.matches(change)]
                    last = batch[-1].cursor
                    if matched:
                        yield matched
                    subscription.position = last
                    if len(batch) < max_batch:
                        break
                continue
            if subscription.buffer:
                ready = _take(subscription.buffer, last, max_batch)
                if ready:
                    last = ready[-1].cursor
                    yield ready
                    subscription.position = last
                continue
            if not await subscription.wait(heartbeat_seconds):
                if subscription.buffer or subscription.overflowed:
                    # A change was published as the wait timed out: deliver it before any heartbeat,
                    # or the heartbeat's cursor would pass it and it would be skipped.
                    continue
                subscription.position = last = max(last, hub.latest_cursor)
                yield Heartbeat(last)
    finally:
        hub.unsubscribe(subscription)


def _take(buffer: deque[Change], last: int, limit: int) -> list[Change]:
    """Up to `limit` buffered changes after cursor `last`, taken off the buffer (older ones were
    already read from the store while catching up)."""
    ready: list[Change] = []
    while buffer and len(ready) < limit:
        change = buffer.popleft()
        if change.cursor > last:
            ready.append(change)
            last = change.cursor
    return ready
