"""The upkeep's timer: a round of work every `interval` seconds on the event loop (request ids
expiring, retention), until cancelled. A round that fails is logged, and the next one tries again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def every(
    interval: float, work: Callable[[], Awaitable[None]], *, name: str, failure: str
) -> asyncio.Task[None]:
    """Starts a task that awaits `work()` every `interval` seconds; `failure` is the log line of a
    round that raised."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await work()
            except Exception:  # the store failed: the next round tries again
                log.exception(failure)

    return asyncio.get_running_loop().create_task(loop(), name=name)


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Stops a task of `every`, and returns once it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
