"""A budget of payload bytes being written at once: what bounds the server's memory under big
requests.

A payload takes many times its size in memory from normalising until its commit is answered (the
decoded values, each item's text and report, the answer with a copy of each report: ~18 times for a
batch of SentSMSReport reports), so the sizes of the payloads in that state at once are held to
`capacity` in sum. A payload that does not fit waits its turn, first come first served: a burst of
big requests costs time, not memory, and none of them an error. Its caller's deadline (or an HTTP
client's timeout) bounds the wait, and a caller that gives up leaves the queue. A payload bigger than
the whole budget runs alone.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """At most `capacity` bytes held at once, granted in the order they were asked for."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int) -> int:
        """Takes `size` bytes of the budget (all of it, at most), waiting for them if need be;
        returns what was taken, to give back with `give`."""
        size = min(size, self.capacity)
        if not self._waiting and self.used + size <= self.capacity:  # no wait: the common case
            self.used += size
            return size
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((size, granted))
        try:
            await granted
        except BaseException:  # the caller gave up while waiting (or just as it was granted)
            if granted.cancelled():
                self._grant()  # those behind it may fit now; _grant drops it
            else:
                self.give(size)
            raise
        return size

    @property
    def waiting(self) -> int:
        """How many are waiting for their turn."""
        return sum(not granted.cancelled() for _, granted in self._waiting)

    def give(self, size: int) -> None:
        """Gives back what `take` returned."""
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        """Lets waiting payloads in, in order, while the first of them fits."""
        while self._waiting:
            size, granted = self._waiting[0]
            if not granted.cancelled() and self.used + size > self.capacity:
                return
            self._waiting.popleft()
            if not granted.cancelled():
                self.used += size
                granted.set_result(None)
