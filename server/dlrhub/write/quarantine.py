"""Quarantined items run through the current normaliser again (RenormaliseQuarantine), or dismissed
(DismissQuarantine).

Each report's outcome is answered in Ingest's BASIC view, without the report: one answer may cover
every open item.

After a fix (a new release, or a changed code table), what now passes is stored like any Ingest,
with its original received time, and its item is resolved; the rest stays open with its current
reason. Given ids must all name quarantined items (otherwise NotFound, and nothing is run);
resolved ones are skipped.

A dismissed item is closed without being stored: it stops counting as open (the
dlrhub_quarantine_open gauge) and is kept, with its dismissal time, until retention prunes it. The
same item received again afterwards is a new open item (it happens again: it deserves a look).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_service_pb2 import (
    DismissQuarantineResponse,
    IngestOutcome,
    RenormaliseQuarantineResponse,
)
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.errors import NotFound
from dlrhub.store.base import ReadRunner, Store, Transaction
from dlrhub.write.committer import Committer
from dlrhub.write.submission import in_view, item_error
from dlrhub.write.writer import Writer

# Quarantined items read (or dismissed) at a time.
PAGE = 500


async def renormalise(
    writer: Writer, store: Store, read: ReadRunner, ids: Sequence[int]
) -> RenormaliseQuarantineResponse:
    """Re-runs the open items among `ids` (every open item when there are none), oldest first.

    Raises NotFound when an id names no quarantined item, StoreError when the store cannot commit
    (what was re-run before that is stored).
    """
    if ids:
        await _check_ids(store, read, ids, "re-run")
    response = RenormaliseQuarantineResponse()
    after = 0
    while True:
        rows = await read(functools.partial(store.quarantined, after, PAGE, include_resolved=False, ids=ids))
        for quarantine_id, item in rows:
            ingested = await writer.renormalise(quarantine_id, item)
            result = response.results.add(id=quarantine_id)
            if ingested.rejection is not None:
                result.results.add(
                    outcome=IngestOutcome.INGEST_OUTCOME_REJECTED, error=item_error(ingested.rejection)
                )
            else:
                result.results.extend(in_view(ingested.response, full=False).results)
            result.resolved = ingested.rejection is None and ingested.response.rejected_count == 0
            if result.resolved:
                response.resolved_count += 1
            else:
                response.still_rejected_count += 1
        if len(rows) < PAGE:
            return response
        after = rows[-1][0]


async def dismiss(
    committer: Committer,
    store: Store,
    read: ReadRunner,
    clock: Callable[[], int],
    *,
    ids: Sequence[int] = (),
    received_before: Timestamp | None = None,
) -> DismissQuarantineResponse:
    """Dismisses the open items among `ids`, or else every open item last received before
    `received_before`, PAGE per transaction. Raises NotFound when an id names no quarantined item
    (nothing is dismissed), StoreError when the store cannot commit."""
    if ids:
        await _check_ids(store, read, ids, "dismissed")
    seconds = clock() // 1_000_000_000
    response = DismissQuarantineResponse()
    if ids:
        wanted = sorted(set(ids))
        for start in range(0, len(wanted), PAGE):
            work = functools.partial(_dismiss, seconds=seconds, ids=wanted[start : start + PAGE])
            response.dismissed_count += await committer.run(work)
    elif received_before is not None:
        while True:  # each batch dismisses the oldest PAGE of what is still open
            work = functools.partial(_dismiss, seconds=seconds, received_before=received_before)
            count = await committer.run(work)
            response.dismissed_count += count
            if count < PAGE:
                break
    response.open_count = await read(store.open_quarantine_count)
    return response


def _dismiss(
    tx: Transaction, *, seconds: int, ids: Sequence[int] = (), received_before: Timestamp | None = None
) -> int:
    return tx.dismiss_quarantined(seconds, PAGE, ids=ids, received_before=received_before)


async def _check_ids(store: Store, read: ReadRunner, ids: Sequence[int], done: str) -> None:
    """Raises NotFound, saying nothing was `done`, when an id of `ids` names no quarantined item."""
    wanted = sorted(set(ids))
    found = await read(
        functools.partial(store.quarantined, 0, len(wanted), include_resolved=True, ids=wanted)
    )
    unknown = sorted(set(wanted) - {quarantine_id for quarantine_id, _ in found})
    if unknown:
        listed = ", ".join(map(str, unknown[:20])) + (", ..." if len(unknown) > 20 else "")
        raise NotFound(
            f"no quarantined item with id {listed}; nothing was {done}",
            ErrorReason.QUARANTINED_ITEM_NOT_FOUND,
            metadata={"ids": ",".join(map(str, unknown[:20])), "count": str(len(unknown))},
        )
