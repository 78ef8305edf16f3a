"""The one way in for every transport: normalise a provider payload, then commit it.

The gRPC Ingest, the webhooks and the poller all call `Writer.ingest`, so a
report takes the same path whichever way it arrives; a quarantined item is
run again through `Writer.renormalise`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestResponse
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise import NormalisedItem, Normaliser, PayloadError, Rejection, single_item_payload
from dlrhub.observability.metrics import Metrics
from dlrhub.store.base import QuarantinedItem
from dlrhub.write.committer import Committer
from dlrhub.write.submission import Applied, Submission, full_answer_bytes

# The largest item (its text, in UTF-8 bytes) by default: real reports are under 2 KB. It bounds
# every stored report, and so each Stream change and every page.
DEFAULT_MAX_ITEM_BYTES = 64 * 1024


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


class RequestIdReused(Exception):
    """The request id names an earlier, different request; nothing of this one was stored."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            "this request_id was used by another request (another format or payload): nothing was"
            " stored; give each request an id of its own"
        )
        self.request_id = request_id


class AnswerTooLarge(Exception):
    """The answer with every normalised report would be over the caller's limit; nothing was stored."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the answer with every report would be about {size} bytes, over the {limit}-byte limit"
        )
        self.size = size
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
        max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
        request_id_ttl: int = 86_400,
        metrics: Metrics | None = None,
    ) -> None:
        self._normaliser = normaliser
        self._committer = committer
        self._clock = clock
        self._max_items = max_items
        self._max_item_bytes = max_item_bytes
        self._request_id_ttl = request_id_ttl
        self._metrics = metrics

    async def ingest(
        self,
        payload: str,
        format: Format.ValueType,
        request_id: str = "",
        *,
        max_full_answer_bytes: int | None = None,
    ) -> Ingested:
        """Normalises and commits a payload.

        Raises, with nothing stored: TooManyItems over the item limit; AnswerTooLarge when
        `max_full_answer_bytes` is given and the answer with every report could be larger;
        RequestIdReused when the request id names another request. Raises StoreError if the store
        cannot commit.
        """
        received = Timestamp()
        received.FromNanoseconds(self._clock())
        rejection = None
        try:
            items = self._normaliser.normalise(payload, format, received)
        except PayloadError as error:
            items, rejection = [], error.rejection
        if len(items) > self._max_items:
            raise TooManyItems(len(items), self._max_items)
        items = self._bounded(items)
        if max_full_answer_bytes is not None:
            size = full_answer_bytes(items)
            if size > max_full_answer_bytes:
                raise AnswerTooLarge(size, max_full_answer_bytes)
        submission = Submission(
            items,
            received,
            request_id,
            rejection,
            payload,
            format,
            request_digest=request_digest(payload, format) if request_id else b"",
            replay_since_seconds=received.seconds - self._request_id_ttl,
        )
        applied = await self._committer.submit(submission)
        if applied.reused:
            raise RequestIdReused(request_id)
        return self._answer(submission, applied)

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
                self._bounded(items),
                received,
                item.request_id,
                quarantine_id=quarantine_id,
                resolved_seconds=resolved_seconds,
            )
        return self._answer(submission, await self._committer.submit(submission))

    def _bounded(self, items: list[NormalisedItem]) -> list[NormalisedItem]:
        """The items, each one over the item size limit rejected (ITEM_TOO_LARGE) instead."""
        limit = self._max_item_bytes
        # len() counts characters, at most 4 bytes each: most items need no encoding to be measured.
        if all(len(item.raw) * 4 <= limit or len(item.raw.encode()) <= limit for item in items):
            return items
        return [item if len(item.raw.encode()) <= limit else _too_large(item, limit) for item in items]

    def _answer(self, submission: Submission, applied: Applied) -> Ingested:
        if self._metrics is not None and not applied.replayed:
            if submission.payload_rejection is not None:
                self._metrics.record_rejected_payload(submission.format)
            else:
                self._metrics.record_ingest(submission.items, applied.response)
        return Ingested(applied.response, submission.payload_rejection)


def request_digest(payload: str, format: Format.ValueType) -> bytes:
    """What a request with a request id was: its format and exact payload text (for typed reports,
    the canonical JSON built from them), hashed."""
    return hashlib.blake2b(f"{int(format)}\n{payload}".encode(), digest_size=16).digest()


def _too_large(item: NormalisedItem, limit: int) -> NormalisedItem:
    size = len(item.raw.encode())
    description = (
        f"{item.path or 'the report'} is {size} bytes; an item may have at most {limit}"
        " (DLRHUB_MAX_ITEM_BYTES)"
    )
    return replace(item, report=None, rejection=Rejection(item.path, ErrorReason.ITEM_TOO_LARGE, description))
