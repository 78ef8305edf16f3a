"""Whether the store can serve, as the gRPC health service tells it; and what /metrics needs from the
store, read ahead so that a scrape never waits on it.

The overall health ("") and the DeliveryReportService's go NOT_SERVING after a commit fails or a probe
fails (or takes longer than `timeout`), and SERVING again once the store answers: a probe runs every
`interval` seconds on a thread of its own (never the reader threads, which may all be waiting on a
stalled store). It reads the store (Store.check), and every 15 seconds counts the open quarantine
items, which /metrics shows; after a failed commit it also commits a small durable write through the
committer, so a store that cannot commit (a full disk) stays NOT_SERVING until it can, rather than
until the next read succeeds. Each change is logged once, with the reason.

Health Check and Watch are answered by grpc_health's servicer from memory: they never wait on the
store either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from dlrhub.store.base import Store

log = logging.getLogger(__name__)

# Seconds between probes, and how long one may take before the store counts as not answering.
INTERVAL = 2.0
TIMEOUT = 5.0
# Seconds between counts of the open quarantine (a count walks every open item), as often as
# Prometheus is commonly set to scrape.
COUNT_INTERVAL = 15.0


class StoreHealth:
    """The store's health from commit outcomes and a periodic probe; and the open quarantine count."""

    def __init__(
        self,
        store: Store,
        set_serving: Callable[[bool], Awaitable[None]],
        *,
        interval: float = INTERVAL,
        timeout: float = TIMEOUT,
    ) -> None:
        self._store = store
        self._set_serving = set_serving
        self.interval = interval
        self.timeout = timeout
        # Quarantined items not resolved, as of the last count (the dlrhub_quarantine_open gauge).
        self.open_quarantine = 0
        self._counted = -COUNT_INTERVAL  # when, on the loop's clock
        # Why the store cannot serve: the last commit failed, or the last probe did; None when fine.
        self._commit_failure: str | None = None
        self._probe_failure: str | None = None
        self.serving = True
        self._check_write: Callable[[], Awaitable[None]] | None = None
        self._probing: asyncio.Task[None] | None = None
        self._told: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlrhub-probe")

    async def start(self, check_write: Callable[[], Awaitable[None]]) -> None:
        """Probes once, then every `interval` seconds; `check_write` commits the small durable write
        (Committer.check)."""
        self._check_write = check_write
        await self.probe()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dlrhub-store-health")

    async def stop(self) -> None:
        for task in (self._task, self._probing):
            if task is not None:
                task.cancel()
        for task in (self._task, self._probing, self._told):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        self._thread.shutdown(wait=False, cancel_futures=True)  # a probe stuck on the store ends with it

    def committed(self, error: Exception | None) -> None:
        """The outcome of a group commit (on the event loop): None when it committed."""
        if error is None:
            if self._commit_failure is not None:
                self._commit_failure = None
                self._update()
        elif self._commit_failure is None:
            self._commit_failure = f"a commit failed: {error}"
            self._update()

    async def probe(self, *, count: bool = True) -> None:
        """Probes the store now (waiting at most `timeout`), and updates health and, with `count`, the
        open quarantine count.

        A probe still running from before (a stalled store) is waited for, not started again."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.get_running_loop().create_task(self._probe(count))
        done, _ = await asyncio.wait({self._probing}, timeout=self.timeout)
        if not done:
            self._probe_failure = f"the store did not answer within {self.timeout:g} s"
            self._update()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            await self.probe(count=loop.time() - self._counted >= COUNT_INTERVAL)

    async def _probe(self, count: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self._store.check)
            if count:
                self.open_quarantine = await loop.run_in_executor(
                    self._thread, self._store.open_quarantine_count
                )
                self._counted = loop.time()
            if self._commit_failure is not None and self._check_write is not None:
                await self._check_write()
        except Exception as error:  # StoreError, by the Store contract
            self._probe_failure = f"the store cannot serve: {error}"
        else:
            self._probe_failure = self._commit_failure = None
        self._update()

    def _update(self) -> None:
        """Tells the health service and the log when the store's health changes."""
        reason = self._commit_failure or self._probe_failure
        serving = reason is None
        if serving == self.serving:
            return
        self.serving = serving
        if serving:
            log.warning("the store serves again: health SERVING")
        else:
            log.error("the store cannot serve: health NOT_SERVING until it can", extra={"reason": reason})
        # Not awaited here: a Watch whose client reads slowly holds the health servicer's lock, and
        # the committer (which calls this) must never wait for it. Each task waits for the one
        # before, then sets whatever is current then, so the last change is the one that stays.
        self._told = asyncio.get_running_loop().create_task(self._tell(self._told))

    async def _tell(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await self._set_serving(self.serving)
