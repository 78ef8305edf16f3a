"""A Stream subscriber's feed: stored changes after a cursor, then live ones.

No gap and no duplicate: the subscription starts before the store is read,
so every change committed after that moment also arrives live; changes at or
before the last cursor delivered are skipped. When the subscriber falls out of
the hub's window (a slow consumer), it catches up from the store again.

What it holds is bounded in bytes too: a live batch takes at most MAX_BATCH_BYTES
of encoded changes off the window, and a catch-up read asks the store for as many
changes as fit in about that much, judging by the changes it last read (the first
read of a catch-up asks for a few: their size is not known yet).

The first item is always a heartbeat with the start position, sent as soon
as the subscription is live, so a caller knows from when changes are covered
and has a cursor to resume from even if nothing matches.

Retention may prune changes ahead of a subscriber catching up from the store: each catch-up read
asks, after the changes, how far the store has pruned (Store.pruned_through); past the last cursor
delivered, changes may be missing, and the feed ends with CursorPruned rather than skip them.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dlrhub.feed.encoding import MAX_BATCH_BYTES, EncodedChange
from dlrhub.feed.hub import Hub
from dlrhub.store.base import Change, ChangeFilter, ReadRunner, Store

# Changes read from the store at a time, and yielded together, at most.
MAX_BATCH = 500
# Changes asked of the store by the first read of a catch-up.
FIRST_READ = 32


class CursorPruned(Exception):
    """Changes after `after` were pruned (through `oldest`) before this feed could read them."""

    def __init__(self, after: int, oldest: int) -> None:
        super().__init__(f"changes after cursor {after} were pruned, through cursor {oldest}")
        self.after = after
        self.oldest = oldest


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
    pruned: int = 0,
) -> AsyncIterator[list[EncodedChange] | Heartbeat]:
    """Changes matching the filter with cursor > `after` (None: only changes from now on), those
    that are ready at the same moment together (never empty, at most `max_batch`): a subscriber that
    sends them in one message keeps up with far more.

    `pruned` is the store's pruned-through position as the caller found it before the feed starts
    (a replay from the beginning, or even a feed from now, may start below it: what was pruned
    then is not its loss); a prune past it and past the last cursor delivered ends the feed with
    CursorPruned."""
    subscription = hub.subscribe(change_filter)
    try:
        if after is None and hub.refresh is not None:
            await hub.refresh()  # what it publishes is at or before "now": skipped below, as it should
        subscription.position = last = hub.latest_cursor if after is None else after
        # The stream is live from here on: say so at once, with the position it starts after.
        yield Heartbeat(last)
        catch_up = True
        while not subscription.closed:
            if catch_up or subscription.overflowed:
                hub.resume(subscription)  # live from here on; what came before is in the store
                catch_up = False
                asked = min(FIRST_READ, max_batch)
                while not subscription.closed:  # a long replay stops at shutdown too
                    batch, pruned_now = await read(functools.partial(changes_and_pruned, store, last, asked))
                    if pruned_now > max(last, pruned):
                        raise CursorPruned(last, pruned_now)
                    if not batch:
                        break
                    matched = [
                        EncodedChange(change, store.cursor_format)
                        for change in batch
                        if change_filter.matches(change)
                    ]
                    last = batch[-1].cursor
                    if matched:
                        yield matched
                    subscription.position = last
                    if len(batch) < asked:
                        break
                    asked = _fitting(batch, max_batch)
                continue
            if subscription.next < hub.end:
                ready = subscription.take(last, max_batch, MAX_BATCH_BYTES)
                if ready:
                    last = ready[-1].cursor
                    yield ready
                    subscription.position = last
                continue
            if not await subscription.wait(heartbeat_seconds):
                if subscription.ready:
                    # A change was published as the wait timed out: deliver it before any heartbeat,
                    # or the heartbeat's cursor would pass it and it would be skipped.
                    continue
                subscription.position = last = max(last, hub.latest_cursor)
                yield Heartbeat(last)
    finally:
        hub.unsubscribe(subscription)


def changes_and_pruned(store: Store, after: int, limit: int) -> tuple[list[Change], int]:
    """Up to `limit` changes after `after`, then how far the store has pruned: read in this order,
    a prune that deleted any change after `after` before the changes were read shows (it raises
    the pruned-through position in the transaction that deletes)."""
    changes = store.changes(after, limit)
    return changes, store.pruned_through()


def _fitting(changes: list[Change], max_batch: int) -> int:
    """How many changes of about the size of these fit in MAX_BATCH_BYTES (1 to `max_batch`)."""
    size = sum(change.report.ByteSize() + change.state.ByteSize() for change in changes)
    return max(1, min(max_batch, MAX_BATCH_BYTES * len(changes) // max(1, size)))
