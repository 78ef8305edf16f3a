"""The one way in for every transport: normalise a provider payload, then commit it.

The gRPC Ingest, the webhooks and the poller all call `Writer.ingest`, so a
report takes the same path whichever way it arrives; a quarantined item is
run again through `Writer.renormalise`.

A payload is normalised on the event loop while it is small (a thread hop would cost more than
the work); a bigger one on a worker thread (`offload`), so that one big request does not stall every
other call. Every payload holds its size in a budget of bytes being written at once (budget.py) from
before it is normalised until its commit is answered, so that big requests do not take memory
without bound. Its items are counted while it is decoded: one over `max_items` ends the decoding.

A body fetched from a provider that hands each report out once is staged first (`stage`: kept raw,
committed durably), then written (`ingest_staged`): its reports, or what is quarantined of it, commit
in the transaction that drops it from the staging table. Nothing in a staged body is refused back (no
one is there to retry it): one that is not UTF-8, holds too many items or cannot be normalised at all
is quarantined whole.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import Channel
from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestResponse
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from deliveryreport.v1.provider_formats_pb2 import GmsReports, SentSmsReports
from dlrhub.normalise import (
    NormalisedItem,
    Normaliser,
    PayloadError,
    Rejection,
    TooManyItems,
    single_item_payload,
    typed_payload,
)
from dlrhub.observability.metrics import Metrics
from dlrhub.store.base import QuarantinedItem, ReadRunner, StagedBody
from dlrhub.write.budget import ByteBudget
from dlrhub.write.committer import Committer
from dlrhub.write.submission import Submission, full_answer_bytes

log = logging.getLogger(__name__)

__all__ = [
    "INLINE_BYTES",
    "AnswerTooLarge",
    "Ingested",
    "RequestIdReused",
    "TooManyItems",
    "TypedReports",
    "Writer",
]

# Reports as typed messages (Ingest's `gms` and `sent_sms_report`).
TypedReports = GmsReports | SentSmsReports
# Payloads up to this size are normalised on the event loop: ~130 GMS reports, 1.5-3 ms, no longer
# than a worker thread holds the GIL (and so the loop) at a time, the 5 ms switch interval; a hop to
# a worker thread and back would cost 2-5% more (bench/normalise_bench.py measures both).
INLINE_BYTES = 32 * 1024
# Payload bytes being written at once, by default: one of the largest requests (16 MiB), or several
# smaller ones (the GIL normalises one at a time anyway).
BUDGET_BYTES = 16 * 1024 * 1024
# The largest item (its text, in UTF-8 bytes) by default: real reports are under 2 KB. It bounds
# every stored report, and so each Stream change and every page.
DEFAULT_MAX_ITEM_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Ingested:
    """What happened to a payload, once committed."""

    response: IngestResponse
    # Set when the payload as a whole was unusable (it was quarantined whole).
    rejection: Rejection | None = None


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
        offload: ReadRunner | None = None,
        budget_bytes: int = BUDGET_BYTES,
    ) -> None:
        self._normaliser = normaliser
        self._committer = committer
        self._clock = clock
        # Items one payload may hold.
        self.max_items = max_items
        self._max_item_bytes = max_item_bytes
        self._request_id_ttl = request_id_ttl
        self._metrics = metrics
        # Runs a big payload's normalising on a worker thread; without it, everything runs inline.
        self._offload = offload
        # Payload bytes being written (normalised and committed) at once.
        self.budget = ByteBudget(budget_bytes)

    async def ingest(
        self,
        payload: str | TypedReports,
        format: Format.ValueType,
        request_id: str = "",
        *,
        max_full_answer_bytes: int | None = None,
        default_channel: Channel.ValueType = Channel.CHANNEL_UNSPECIFIED,
    ) -> Ingested:
        """Normalises and commits a payload (provider text, or typed reports: then `format` is theirs).

        `default_channel` is the channel of the endpoint it came to (a per-channel webhook): the
        channel of a report that names none (SMS when it is unspecified).

        Raises, with nothing stored: TooManyItems over the item limit; AnswerTooLarge when
        `max_full_answer_bytes` is given and the answer with every report could be larger;
        RequestIdReused when the request id names another request. Raises StoreError if the store
        cannot commit.
        """
        size = len(payload) if isinstance(payload, str) else payload.ByteSize()
        prepare = functools.partial(
            self._prepare,
            payload,
            format,
            self._now(),
            request_id,
            self.max_items,
            max_full_answer_bytes=max_full_answer_bytes,
            default_channel=default_channel,
        )
        return await self._write(size, prepare)

    async def stage(
        self,
        body: bytes,
        content_type: str,
        format: Format.ValueType,
        default_channel: Channel.ValueType = Channel.CHANNEL_UNSPECIFIED,
    ) -> StagedBody:
        """Keeps a fetched body as it came, committed durably before anything reads it; returns it
        with its id, for `ingest_staged`. Raises StoreError if the store cannot commit."""
        now = self._now()
        staged = StagedBody(body, content_type, format, default_channel, now.seconds, now.nanos)
        staged_id = await self._committer.run(lambda tx: tx.stage(staged))
        return replace(staged, id=staged_id)

    async def staged(self, after: int, limit: int) -> list[StagedBody]:
        """Up to `limit` staged bodies with id > `after`, oldest first (read on the writer thread,
        between commits). Raises StoreError."""
        return await self._committer.run(lambda tx: tx.staged(after, limit))

    async def ingest_staged(self, staged: StagedBody) -> Ingested:
        """Normalises and commits a staged body, unstaging it in the same transaction; its reports
        keep the time it was fetched. Raises StoreError (only) if the store cannot commit."""
        rejection = None
        try:
            payload = staged.body.decode("utf-8")
        except UnicodeDecodeError as error:  # JSON is UTF-8 (RFC 8259), whatever the charset says
            payload = staged.body.decode("utf-8", "backslashreplace")  # quarantined readable, whole
            rejection = Rejection("", ErrorReason.INVALID_UTF8, f"the body is not UTF-8 (byte {error.start})")
        prepare = functools.partial(
            self._prepare,
            payload,
            Format.ValueType(staged.format),
            staged.received_time(),
            "",
            self.max_items,
            default_channel=Channel.ValueType(staged.default_channel),
            staged_id=staged.id,
            rejection=rejection,
        )
        return await self._write(len(payload), prepare)

    async def renormalise(self, quarantine_id: int, item: QuarantinedItem) -> Ingested:
        """Runs a quarantined item through the current normaliser again, and commits what now passes.

        It keeps its original received time. The item is resolved when nothing in it is rejected.
        """
        received = item.received_time()
        resolved_seconds = self._clock() // 1_000_000_000  # now: when it is resolved, if it is
        # One item of a batch runs in a batch of its own, as it came.
        payload = item.raw if item.whole_payload else single_item_payload(item.raw, item.format)
        prepare = functools.partial(
            self._prepare,
            payload,
            Format.ValueType(item.format),
            received,
            item.request_id,
            None,  # an item kept in the quarantine is run again whatever the limit is now
            quarantine_id=quarantine_id,
            resolved_seconds=resolved_seconds,
            default_channel=Channel.ValueType(item.default_channel),
        )
        return await self._write(len(payload), prepare)

    async def _write(self, size: int, prepare: Callable[[], Submission]) -> Ingested:
        """Commits what `prepare()` makes of a payload of `size` (normalised inline when it is small,
        else on a worker thread), holding `size` of the byte budget meanwhile."""
        taken = await self.budget.take(size)
        try:
            if self._offload is None or size <= INLINE_BYTES:
                submission = prepare()
            else:
                submission = await self._offload(prepare)
            return await self._commit(submission)
        finally:
            self.budget.give(taken)

    def _prepare(
        self,
        payload: str | TypedReports,
        format: Format.ValueType,
        received: Timestamp,
        request_id: str,
        max_items: int | None,
        *,
        max_full_answer_bytes: int | None = None,
        quarantine_id: int = 0,
        resolved_seconds: int = 0,
        default_channel: Channel.ValueType = Channel.CHANNEL_UNSPECIFIED,
        staged_id: int = 0,
        rejection: Rejection | None = None,
    ) -> Submission:
        """The submission of a normalised payload (on a worker thread for a big one). A staged body
        (`staged_id`) is never refused: whatever would refuse it quarantines it whole instead, as
        does `rejection`, a reason found before."""
        if not isinstance(payload, str):
            typed = payload.reports if isinstance(payload, GmsReports) else payload.results
            if max_items is not None and len(typed) > max_items:
                raise TooManyItems(max_items)
            payload, format = typed_payload(payload)
        # What an Ingest with a request id was (a re-normalisation carries its item's id only to keep it).
        digest = request_digest(payload, format) if request_id and not quarantine_id else b""
        submission = functools.partial(
            Submission,
            received=received,
            request_id=request_id,
            payload=payload,
            format=format,
            quarantine_id=quarantine_id,
            resolved_seconds=resolved_seconds,
            request_digest=digest,
            replay_since_seconds=received.seconds - self._request_id_ttl,
            staged_id=staged_id,
            default_channel=default_channel,
        )
        if rejection is not None:
            return submission([], payload_rejection=rejection)
        try:
            items = self._normaliser.normalise(
                payload,
                format,
                received,
                default_channel=default_channel or Channel.CHANNEL_SMS,
                max_items=max_items,
            )
        except PayloadError as error:
            return submission([], payload_rejection=error.rejection)
        except TooManyItems as error:
            if not staged_id:
                raise
            return submission([], payload_rejection=Rejection("", ErrorReason.TOO_MANY_ITEMS, str(error)))
        except Exception:
            if not staged_id:
                raise
            log.exception("a staged body could not be normalised; it is quarantined whole")
            description = (
                "the body could not be normalised (the server's log says why); run it again after a fix"
            )
            return submission([], payload_rejection=Rejection("", ErrorReason.INTERNAL, description))
        items = self._bounded(items)
        if max_full_answer_bytes is not None:
            size = full_answer_bytes(items)
            if size > max_full_answer_bytes:
                raise AnswerTooLarge(size, max_full_answer_bytes)
        return submission(items)

    def _now(self) -> Timestamp:
        received = Timestamp()
        received.FromNanoseconds(self._clock())
        return received

    def _bounded(self, items: list[NormalisedItem]) -> list[NormalisedItem]:
        """The items, each one over the item size limit rejected (ITEM_TOO_LARGE) instead."""
        limit = self._max_item_bytes
        # len() counts characters, at most 4 bytes each: most items need no encoding to be measured.
        if all(len(item.raw) * 4 <= limit or len(item.raw.encode()) <= limit for item in items):
            return items
        return [item if len(item.raw.encode()) <= limit else _too_large(item, limit) for item in items]

    async def _commit(self, submission: Submission) -> Ingested:
        applied = await self._committer.submit(submission)
        if applied.reused:
            raise RequestIdReused(submission.request_id)
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
