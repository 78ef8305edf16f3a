"""What every engine shares: StoreError for its own errors, the page of messages_by, and the rows
both schemas spell alike (the quarantine's columns, a report kept apart from its raw text)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from dlrhub.statuses import FINAL as FINAL_STATUSES
from dlrhub.store.base import MessagePage, QuarantinedItem, StoreError

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type)


def store_errors(engine_error: type[Exception] | tuple[type[Exception], ...]) -> Callable[[C], C]:
    """A class decorator: each public method of the class raises StoreError (base.py's contract)
    where the engine raises `engine_error`, so nothing above the store sees an engine's exception."""

    def guard(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except engine_error as error:
                raise StoreError(f"{method.__name__}: {error}") from error

        return guarded

    def decorate(cls: C) -> C:
        for name, member in list(vars(cls).items()):
            if callable(member) and not name.startswith("_"):
                setattr(cls, name, guard(member))
        return cls

    return decorate


def message_page(
    rows: Sequence[tuple[int, bytes]], counts: dict[int, int], limit: int, max_bytes: int
) -> MessagePage:
    """The page of messages_by from up to `limit + 1` (position, state) rows in order and the status
    counts of all that match: it stops before the states would pass `max_bytes` (one at least)."""
    kept = size = 0
    for _, report in rows[:limit]:
        size += len(report)
        if kept and size > max_bytes:
            break
        kept += 1
    more = len(rows) > kept
    page = rows[:kept]
    return MessagePage(
        states=[DeliveryReport.FromString(report) for _, report in page],
        next_after=page[-1][0] if more else None,
        total=sum(counts.values()),
        status_counts=counts,
    )


# A message in a final status: the predicate of the index of final messages by last change.
FINAL = f"status IN ({', '.join(str(status) for status in sorted(FINAL_STATUSES))})"
# A quarantined item neither resolved nor dismissed: the predicate of the open digests' index.
OPEN = "resolved_seconds IS NULL AND dismissed_seconds IS NULL"

QUARANTINE_COLUMNS = (
    "id, raw, field, reason, description, received_seconds, request_id, format, whole_payload,"
    " resolved_seconds, received_nanos, received_count, last_received_seconds, last_received_nanos,"
    " default_channel, dismissed_seconds"
)


def quarantined_item(row: Sequence[Any]) -> tuple[int, QuarantinedItem]:
    """A quarantine row's id and item, from QUARANTINE_COLUMNS."""
    item = QuarantinedItem(
        raw=row[1],
        field=row[2],
        reason=row[3],
        description=row[4],
        received_seconds=row[5],
        request_id=row[6],
        format=row[7],
        whole_payload=bool(row[8]),
        resolved_seconds=row[9],
        received_nanos=row[10],
        received_count=row[11],
        last_received_seconds=row[12],
        last_received_nanos=row[13],
        default_channel=row[14],
        dismissed_seconds=row[15],
    )
    return row[0], item


def with_raw(report: bytes, raw: str) -> DeliveryReport:
    """A stored report with its original text put back (kept in a column of its own)."""
    message = DeliveryReport.FromString(report)
    message.raw_payload = raw
    return message


def without_raw(report: DeliveryReport) -> bytes:
    """A report as stored: without its original text (kept in a column of its own)."""
    stored = DeliveryReport()
    stored.CopyFrom(report)
    stored.ClearField("raw_payload")
    return stored.SerializeToString()


def channel_and_seconds(state: DeliveryReport) -> tuple[int, int]:
    """A message's `channel` and `state_seconds` columns (Store.awaiting_seen), from its state: its
    channel, and its event time, else its received time, in Unix seconds."""
    time = state.event_time if state.HasField("event_time") else state.received_time
    return state.channel, time.seconds
