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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from dlrhub.hub import Hub
from dlrhub.store.base import Change, ChangeFilter, Store

T = TypeVar("T")
# Runs a blocking store read off the event loop.
ReadRunner = Callable[[Callable[[], T]], Awaitable[T]]

REPLAY_BATCH = 500


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing matched for a while; `cursor` is the latest position (safe to resume after)."""

    cursor: int


async def follow(
    store: Store,
    hub: Hub,
    read: ReadRunner[list[Change]],
    change_filter: ChangeFilter,
    after: int | None,
    heartbeat_seconds: float,
) -> AsyncIterator[Change | Heartbeat]:
    """Changes matching the filter with cursor > `after` (None: only changes from now on)."""
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
                while True:
                    batch = await read(functools.partial(store.changes, last, REPLAY_BATCH))
                    for change in batch:
                        if change_filter.matches(change):
                            yield change
                        subscription.position = last = change.cursor
                    if len(batch) < REPLAY_BATCH:
                        break
                continue
            if subscription.buffer:
                change = subscription.buffer.popleft()
                if change.cursor > last:
                    yield change
                    subscription.position = last = change.cursor
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
