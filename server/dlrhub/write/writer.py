"""The one way in for every transport: normalise a provider payload, then commit it.

The gRPC Ingest, the webhooks and the poller all call `Writer.ingest`, so a
report takes the same path whichever way it arrives; a quarantined item is
run again through `Writer.renormalise`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestResponse
from dlrhub.normalise import Normaliser, PayloadError, Rejection, single_item_payload
from dlrhub.observability.metrics import Metrics
from dlrhub.store.base import QuarantinedItem
from dlrhub.write.committer import Committer
from dlrhub.write.submission import Submission


@dataclass(frozen=True, slots=True)
class Ingested:
    """What happened to a payload, once committed."""

    response: IngestResponse
    # Set when the payload as a whole was unusable (it was quarantined whole).
    rejection: Rejection | None = None


class TooManyItems(Exception):
    """A payload holds more items than one call may carry; nothing of it was stored."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} items in one payload; at most {limit} are allowed: split the batch")
        self.count = count
        self.limit = limit


class Writer:
    """Normalises payloads and hands them to the committer; answers once they are committed."""

    def __init__(
        self,
        normaliser: Normaliser,
        committer: Committer,
        clock: Callable[[], int],
        *,
        max_items: int = 10_000,
        metrics: Metrics | None = None,
    ) -> None:
        self._normaliser = normaliser
        self._committer = committer
        self._clock = clock
        self._max_items = max_items
        self._metrics = metrics

    async def ingest(self, payload: str, format: Format.ValueType, request_id: str = "") -> Ingested:
        """Normalises and commits a payload.

        Raises TooManyItems (nothing stored) over the item limit, StoreError if the store cannot commit.
        """
        received = Timestamp()
        received.FromNanoseconds(self._clock())
        try:
            items = self._normaliser.normalise(payload, format, received)
        except PayloadError as error:
            submission = Submission([], received, request_id, error.rejection, payload, format)
        else:
            if len(items) > self._max_items:
                raise TooManyItems(len(items), self._max_items)
            submission = Submission(items, received, request_id)
        return await self._commit(submission)

    async def renormalise(self, quarantine_id: int, item: QuarantinedItem) -> Ingested:
        """Runs a quarantined item through the current normaliser again, and commits what now passes.

        It keeps its original received time. The item is resolved when nothing in it is rejected.
        """
        received = item.received_time()
        resolved_seconds = self._clock() // 1_000_000_000  # now: when it is resolved, if it is
        # One item of a batch runs in a batch of its own, as it came.
        payload = item.raw if item.whole_payload else single_item_payload(item.raw, item.format)
        try:
            items = self._normaliser.normalise(payload, Format.ValueType(item.format), received)
        except PayloadError as error:
            submission = Submission(
                [],
                received,
                item.request_id,
                error.rejection,
                payload,
                item.format,
                quarantine_id=quarantine_id,
                resolved_seconds=resolved_seconds,
            )
        else:
            submission = Submission(
                items,
                received,
                item.request_id,
                quarantine_id=quarantine_id,
                resolved_seconds=resolved_seconds,
            )
        return await self._commit(submission)

    async def _commit(self, submission: Submission) -> Ingested:
        applied = await self._committer.submit(submission)
        if self._metrics is not None and not applied.replayed:
            if submission.payload_rejection is not None:
                self._metrics.record_rejected_payload(submission.format)
            else:
                self._metrics.record_ingest(submission.items, applied.response)
        return Ingested(applied.response, submission.payload_rejection)
