"""The one way in for every transport: normalise a provider payload, then commit it.

The gRPC Ingest, the webhooks and the poller all call `Writer.ingest`, so a
report takes the same path whichever way it arrives; a quarantined item is
run again through `Writer.renormalise`.

A payload's items are counted while it is decoded: one over `max_items` ends the decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestResponse
from deliveryreport.v1.provider_formats_pb2 import GmsReports, SentSmsReports
from dlrhub.normalise import (
    Normaliser,
    PayloadError,
    Rejection,
    TooManyItems,
    single_item_payload,
    typed_payload,
)
from dlrhub.observability.metrics import Metrics
from dlrhub.store.base import QuarantinedItem
from dlrhub.write.committer import Committer
from dlrhub.write.submission import Submission

__all__ = ["Ingested", "TooManyItems", "TypedReports", "Writer"]

# Reports as typed messages (Ingest's `gms` and `sent_sms_report`).
TypedReports = GmsReports | SentSmsReports


@dataclass(frozen=True, slots=True)
class Ingested:
    """What happened to a payload, once committed."""

    response: IngestResponse
    # Set when the payload as a whole was unusable (it was quarantined whole).
    rejection: Rejection | None = None


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
        # Items one payload may hold.
        self.max_items = max_items
        self._metrics = metrics

    async def ingest(
        self, payload: str | TypedReports, format: Format.ValueType, request_id: str = ""
    ) -> Ingested:
        """Normalises and commits a payload (provider text, or typed reports: then `format` is theirs).

        Raises TooManyItems (nothing stored) over the item limit, StoreError if the store cannot commit.
        """
        received = Timestamp()
        received.FromNanoseconds(self._clock())
        return await self._commit(self._prepare(payload, format, received, request_id, self.max_items))

    async def renormalise(self, quarantine_id: int, item: QuarantinedItem) -> Ingested:
        """Runs a quarantined item through the current normaliser again, and commits what now passes.

        It keeps its original received time. The item is resolved when nothing in it is rejected.
        """
        received = item.received_time()
        resolved_seconds = self._clock() // 1_000_000_000  # now: when it is resolved, if it is
        # One item of a batch runs in a batch of its own, as it came.
        payload = item.raw if item.whole_payload else single_item_payload(item.raw, item.format)
        submission = self._prepare(
            payload,
            Format.ValueType(item.format),
            received,
            item.request_id,
            None,  # an item kept in the quarantine is run again whatever the limit is now
            quarantine_id=quarantine_id,
            resolved_seconds=resolved_seconds,
        )
        return await self._commit(submission)

    def _prepare(
        self,
        payload: str | TypedReports,
        format: Format.ValueType,
        received: Timestamp,
        request_id: str,
        max_items: int | None,
        *,
        quarantine_id: int = 0,
        resolved_seconds: int = 0,
    ) -> Submission:
        """The submission of a normalised payload."""
        if not isinstance(payload, str):
            typed = payload.reports if isinstance(payload, GmsReports) else payload.results
            if max_items is not None and len(typed) > max_items:
                raise TooManyItems(max_items)
            payload, format = typed_payload(payload)
        try:
            items = self._normaliser.normalise(payload, format, received, max_items=max_items)
        except PayloadError as error:
            return Submission(
                [],
                received,
                request_id,
                error.rejection,
                payload,
                format,
                quarantine_id=quarantine_id,
                resolved_seconds=resolved_seconds,
            )
        return Submission(
            items, received, request_id, quarantine_id=quarantine_id, resolved_seconds=resolved_seconds
        )

    async def _commit(self, submission: Submission) -> Ingested:
        applied = await self._committer.submit(submission)
        if self._metrics is not None and not applied.replayed:
            if submission.payload_rejection is not None:
                self._metrics.record_rejected_payload(submission.format)
            else:
                self._metrics.record_ingest(submission.items, applied.response)
        return Ingested(applied.response, submission.payload_rejection)
