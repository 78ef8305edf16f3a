"""Retention: messages that reached a final status, with their history and raw text, and closed
quarantined items are deleted once they are older than DLRHUB_RETENTION (off by default).

A message's age runs from its last change: the received time of its latest stored report. Pruning
runs on the writer thread a small batch per transaction (BATCH messages with their reports, or
BATCH quarantined items), so an Ingest waits at most one batch, a few milliseconds, for it. It runs
every `interval` seconds while retention is on, and when PruneMessages asks (`dlrhub prune`).

A report that arrives later for a pruned message starts it afresh: its old state and history are
gone, so it is new. Stream resumed from a cursor before a pruned change is OUT_OF_RANGE
(Store.pruned_through).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from dlrhub.store.base import Pruned, Transaction
from dlrhub.write import periodic
from dlrhub.write.committer import Committer

log = logging.getLogger(__name__)
# Messages (with their reports), or quarantined items, deleted per transaction. A batch's durable
# commit writes the pages it emptied: with 50 messages of two 0.5 KB reports each, a transaction
# took 5 ms (median; its statements 1 ms) on a loaded two-core machine, 200 took 20 ms.
BATCH = 50


@dataclass(slots=True)
class Pruning:
    """What one prune deleted: in all, and per transaction."""

    total: Pruned = field(default_factory=Pruned)
    transactions: list[Pruned] = field(default_factory=list)

    def add(self, batch: Pruned) -> None:
        self.total += batch
        self.transactions.append(batch)


class Retention:
    """Prunes what is older than `retention_seconds` every `interval` seconds (a tenth of the
    retention, at most 10 minutes, unless given) once started; `prune` on demand."""

    def __init__(
        self,
        committer: Committer,
        clock: Callable[[], int],
        retention_seconds: int | None,
        *,
        interval: float | None = None,
        batch: int = BATCH,
    ) -> None:
        self._committer = committer
        self._clock = clock
        self.retention_seconds = retention_seconds
        self._interval = interval  # None: from the retention
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Prunes periodically, if retention is on."""
        seconds = self.retention_seconds
        if seconds is not None:
            interval = min(seconds / 10, 600.0) if self._interval is None else self._interval
            self._task = periodic.every(
                interval,
                functools.partial(self._round, seconds),
                name="dlrhub-retention",
                failure="could not prune; trying again later",
            )

    async def stop(self) -> None:
        await periodic.cancel(self._task)
        self._task = None

    async def prune(self, older_than_seconds: int) -> Pruning:
        """Deletes every final message, and every closed quarantined item, that last changed more than
        `older_than_seconds` ago, a batch per transaction. Raises StoreError if the store cannot commit
        (the batches before it stay deleted)."""
        before = self._clock() // 1_000_000_000 - older_than_seconds
        pruning = Pruning()
        for work in (_prune_messages, _prune_quarantined):
            while True:
                batch = await self._committer.run(functools.partial(work, before=before, limit=self._batch))
                pruning.add(batch)
                if batch.messages + batch.quarantined < self._batch:
                    break
        return pruning

    async def _round(self, seconds: int) -> None:
        pruned = (await self.prune(seconds)).total
        if pruned != Pruned():
            log.info(
                "pruned",
                extra={
                    "messages": pruned.messages,
                    "reports": pruned.reports,
                    "quarantined": pruned.quarantined,
                },
            )


def _prune_messages(tx: Transaction, *, before: int, limit: int) -> Pruned:
    return tx.prune_messages(before, limit)


def _prune_quarantined(tx: Transaction, *, before: int, limit: int) -> Pruned:
    return Pruned(quarantined=tx.prune_quarantined(before, limit))
