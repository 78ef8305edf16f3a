"""Request ids expire: the saved answers of Ingest calls are kept for a time (DLRHUB_REQUEST_ID_TTL),
then deleted, a small batch per transaction on the writer thread, so no Ingest waits long.

An expired answer is never replayed, deleted or not (Transaction.find_response); deleting it only
keeps the table from growing forever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from dlrhub.store.base import Transaction
from dlrhub.write import periodic
from dlrhub.write.committer import Committer

log = logging.getLogger(__name__)
# Saved answers deleted per transaction.
BATCH = 500


class RequestIdExpiry:
    """Deletes expired saved answers every `interval` seconds (half the time-to-live, at most 10
    minutes, unless given)."""

    def __init__(
        self,
        committer: Committer,
        clock: Callable[[], int],
        ttl_seconds: int,
        *,
        interval: float | None = None,
    ) -> None:
        self._committer = committer
        self._clock = clock
        self._ttl = ttl_seconds
        self._interval = min(ttl_seconds / 2, 600.0) if interval is None else interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = periodic.every(
            self._interval,
            self._round,
            name="dlrhub-request-id-expiry",
            failure="could not delete expired request ids; trying again later",
        )

    async def stop(self) -> None:
        await periodic.cancel(self._task)
        self._task = None

    async def expire(self) -> int:
        """Deletes every saved answer older than the time-to-live, BATCH at a time; how many."""
        before = self._clock() // 1_000_000_000 - self._ttl
        deleted = 0
        while True:
            count = await self._committer.run(functools.partial(_expire, before=before))
            deleted += count
            if count < BATCH:
                return deleted

    async def _round(self) -> None:
        if deleted := await self.expire():
            log.info("request ids expired", extra={"deleted": deleted})


def _expire(tx: Transaction, *, before: int) -> int:
    return tx.expire_responses(before, BATCH)
