"""Ingest as a unit of work: normalised items -> merge -> store, inside one transaction.

The committer runs `apply` on each group of submissions inside a single store
transaction; the changes it returns are published only after that transaction
has committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_service_pb2 import (
    IngestOutcome,
    IngestResponse,
    ItemError,
)
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.merge import MergeKey, merge, merge_key
from dlrhub.normalise import NormalisedItem, Rejection
from dlrhub.store.base import PLAIN_CURSORS, Change, CursorFormat, QuarantinedItem, SavedResponse, Transaction


@dataclass(frozen=True, slots=True)
class Submission:
    """One Ingest call (or webhook post, or poll) to apply."""

    items: list[NormalisedItem]
    received: Timestamp
    request_id: str = ""
    # Set when the payload as a whole was unusable: it is quarantined whole.
    payload_rejection: Rejection | None = None
    payload: str = ""
    # The format the payload was given as (for quarantining it whole).
    format: int = 0
    # A re-normalisation of this quarantined item: rejections are not quarantined
    # again, and the item is resolved when nothing in it is rejected.
    quarantine_id: int = 0
    # For a re-normalisation: when it ran (Unix seconds), the item's resolved time. `received` is
    # the item's original received time, kept for the reports.
    resolved_seconds: int = 0
    # For an Ingest with a request id: what the request was (saved with its answer), and the Unix
    # time before which a saved answer has expired.
    request_digest: bytes = b""
    replay_since_seconds: int = 0


@dataclass(frozen=True, slots=True)
class Applied:
    """The answer to a submission, and the changes to publish after the commit."""

    response: IngestResponse
    changes: list[Change] = field(default_factory=list)
    # The response is the saved answer of an earlier call with the same request id.
    replayed: bool = False
    # The request id was used before by another request: nothing was applied.
    reused: bool = False


def apply(
    tx: Transaction, submissions: Sequence[Submission], cursors: CursorFormat = PLAIN_CURSORS
) -> list[Applied]:
    """Applies a group of submissions, in order, inside an open transaction; `cursors` is how the
    store writes cursors (for the results)."""
    keys = [[merge_key(item.report) if item.report else None for item in s.items] for s in submissions]
    tx.prefetch(
        {
            (item.report.source, item.report.message_id)
            for s in submissions
            for item in s.items
            if item.report
        },
        {key.digest for group in keys for key in group if key},
        {s.request_id for s in submissions if s.request_digest},
    )
    return [
        _apply(tx, submission, group, cursors) for submission, group in zip(submissions, keys, strict=True)
    ]


def _apply(
    tx: Transaction, submission: Submission, keys: list[MergeKey | None], cursors: CursorFormat
) -> Applied:
    """Applies one submission; `keys` are the merge keys of its items (None for a rejected one)."""
    # A re-normalisation carries its item's request id only to remember it: it is no retry of that
    # Ingest (it has no request digest), so it neither replays the saved answer nor saves one.
    if submission.request_digest:
        saved = tx.find_response(submission.request_id, submission.replay_since_seconds)
        if saved is not None and saved.request_digest != submission.request_digest:
            return Applied(IngestResponse(), reused=True)
        if saved is not None:
            replay = IngestResponse.FromString(saved.response)
            replay.replayed = True
            return Applied(replay, replayed=True)
    if submission.payload_rejection is not None:
        if not submission.quarantine_id:
            tx.quarantine(
                _quarantined(
                    submission, submission.payload, submission.payload_rejection, submission.format, True
                )
            )
        return Applied(IngestResponse(rejected_count=1))

    response = IngestResponse()
    changes: list[Change] = []
    for item, key in zip(submission.items, keys, strict=True):
        result = response.results.add(index=item.index)
        if item.report is None:
            assert item.rejection is not None
            if not submission.quarantine_id:
                tx.quarantine(_quarantined(submission, item.raw, item.rejection, item.format, False))
            result.outcome = IngestOutcome.INGEST_OUTCOME_REJECTED
            result.error.CopyFrom(item_error(item.rejection))
            response.rejected_count += 1
            continue
        report = item.report
        assert key is not None
        result.report.CopyFrom(report)
        result.report.ClearField("raw_payload")  # the caller sent it; GetMessage and Stream carry it
        if tx.is_stored(key.digest):
            result.outcome = IngestOutcome.INGEST_OUTCOME_DUPLICATE
            response.duplicate_count += 1
            continue
        state = merge(tx.load_state(report.source, report.message_id), report, key)
        cursor = tx.append(report, key.digest, state)
        changes.append(Change(cursor, report, state.report))
        result.outcome = IngestOutcome.INGEST_OUTCOME_ACCEPTED
        result.cursor = cursors.format(cursor)
        response.accepted_count += 1

    if submission.request_digest and not is_wholly_rejected(response):
        saved = SavedResponse(submission.request_digest, response.SerializeToString())
        tx.save_response(submission.request_id, saved, submission.received.seconds)
    if submission.quarantine_id and not response.rejected_count:
        tx.resolve_quarantined(
            submission.quarantine_id, submission.resolved_seconds or submission.received.seconds
        )
    return Applied(response, changes)


def in_view(response: IngestResponse, full: bool) -> IngestResponse:
    """The answer in the BASIC view (each result names its message, no report) or the FULL one (with
    the reports too). Changes `response` in place."""
    for result in response.results:
        if result.HasField("report"):
            result.message_id = result.report.message_id
            if not full:
                result.ClearField("report")
    return response


# What a result adds to its report and error, at most: its framing, index, outcome, cursor (19
# digits) and the framing of its report and message id.
_RESULT_BYTES = 64


def full_answer_bytes(items: list[NormalisedItem]) -> int:
    """An upper bound of the encoded IngestResponse of these items in the FULL view."""
    total = 32  # the counts
    for item in items:
        report = item.report
        if report is None:
            assert item.rejection is not None
            total += _RESULT_BYTES + item_error(item.rejection).ByteSize()
        else:  # the answer's copy has no raw_payload (its framing stays counted), and a message_id
            raw = len(report.raw_payload.encode())
            total += _RESULT_BYTES + report.ByteSize() - raw + len(report.message_id.encode())
    return total


def is_wholly_rejected(response: IngestResponse) -> bool:
    """Nothing in the request was usable: every item (at least one) was rejected."""
    return response.rejected_count > 0 and response.accepted_count == response.duplicate_count == 0


def item_error(rejection: Rejection) -> ItemError:
    """A rejection as the caller sees it."""
    return ItemError(
        field=rejection.field, reason=ErrorReason.Name(rejection.reason), description=rejection.description
    )


def _quarantined(
    submission: Submission, raw: str, rejection: Rejection, format: int, whole_payload: bool
) -> QuarantinedItem:
    return QuarantinedItem(
        raw=raw,
        field=rejection.field,
        reason=ErrorReason.Name(rejection.reason),
        description=rejection.description,
        received_seconds=submission.received.seconds,
        received_nanos=submission.received.nanos,
        request_id=submission.request_id,
        format=format,
        whole_payload=whole_payload,
    )
