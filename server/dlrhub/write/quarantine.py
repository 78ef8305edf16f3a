"""Quarantined items run through the current normaliser again (RenormaliseQuarantine).

Each report's outcome is answered in Ingest's BASIC view, without the report: one answer may cover
every open item.

After a fix (a new release, or a changed code table), what now passes is stored like any Ingest,
with its original received time, and its item is resolved; the rest stays open with its current
reason. Given ids must all name quarantined items (otherwise NotFound, and nothing is run);
resolved ones are skipped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from deliveryreport.v1.delivery_report_service_pb2 import IngestOutcome, RenormaliseQuarantineResponse
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.errors import NotFound
from dlrhub.store.base import ReadRunner, Store
from dlrhub.write.submission import in_view, item_error
from dlrhub.write.writer import Writer

# Quarantined items read at a time.
PAGE = 500


async def renormalise(
    writer: Writer, store: Store, read: ReadRunner, ids: Sequence[int]
) -> RenormaliseQuarantineResponse:
    """Re-runs the open items among `ids` (every open item when there are none), oldest first.

    Raises NotFound when an id names no quarantined item, StoreError when the store cannot commit
    (what was re-run before that is stored).
    """
    if ids:
        wanted = sorted(set(ids))
        found = await read(
            functools.partial(store.quarantined, 0, len(wanted), include_resolved=True, ids=wanted)
        )
        unknown = sorted(set(wanted) - {quarantine_id for quarantine_id, _ in found})
        if unknown:
            listed = ", ".join(map(str, unknown[:20])) + (", ..." if len(unknown) > 20 else "")
            raise NotFound(
                f"no quarantined item with id {listed}; nothing was re-run",
                ErrorReason.QUARANTINED_ITEM_NOT_FOUND,
                metadata={"ids": ",".join(map(str, unknown[:20])), "count": str(len(unknown))},
            )
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
