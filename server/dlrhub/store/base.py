"""The storage interface: what the service needs from any engine.

Every method is blocking and is called from worker threads, never from the
event loop: async code awaits a read through a ReadRunner (the app's reader
threads), and writes run on the committer's writer thread. Writes happen only
inside `Store.transaction()`, from one writer thread at a time; reads may run
concurrently from other threads and see only committed data.

Errors: an engine raises StoreError for every failure to read or commit,
wrapping its own exceptions, so nothing above the store sees an engine's error
(the gRPC interceptor answers it UNAVAILABLE); a transaction that raises is
rolled back whole, and nothing in it was acknowledged.

The contract tests in tests/test_store_contract.py run against every engine.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from dlrhub.merge import MessageState

T = TypeVar("T")


class ReadRunner(Protocol):
    """Runs a blocking call on a worker thread (a store call on a reader thread); the event loop
    awaits its result."""

    def __call__(self, call: Callable[[], T], /) -> Awaitable[T]: ...


class StoreError(Exception):
    """The store could not read or commit."""


@dataclass(frozen=True, slots=True)
class Change:
    """One stored report, as the Stream delivers it."""

    # Position in the history: strictly increasing, never reused.
    cursor: int
    # The report as normalised (with its raw text).
    report: DeliveryReport
    # The message's merged state right after this report.
    state: DeliveryReport


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """Which changes a Stream wants; empty fields match everything."""

    bulk_id: str = ""
    message_ids: frozenset[str] = frozenset()
    statuses: frozenset[int] = frozenset()
    channels: frozenset[int] = frozenset()
    source: int = 0

    def matches(self, change: Change) -> bool:
        report = change.report
        return (
            (not self.bulk_id or change.state.bulk_id == self.bulk_id)
            and (not self.message_ids or report.message_id in self.message_ids)
            and (not self.statuses or report.status in self.statuses)
            and (not self.channels or report.channel in self.channels)
            and (not self.source or report.source == self.source)
        )


class Selector(enum.StrEnum):
    """A field that several messages may share, to select them by (Store.messages_by)."""

    BULK_ID = "bulk_id"
    REFERENCE = "reference"


@dataclass(frozen=True, slots=True)
class MessagePage:
    """A page of message states in a stable order."""

    states: list[DeliveryReport]
    # Position of the last message on the page, to continue after; None at the end.
    next_after: int | None
    # Messages matching in all, and how many are in each status.
    total: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QuarantinedItem:
    """A rejected item, kept with the reason so it can be re-normalised later."""

    raw: str
    field: str
    reason: str
    description: str
    received_seconds: int
    request_id: str = ""
    # The format it was read as (a Format value; 0 when it could not be told).
    format: int = 0
    # A whole payload rather than one item of a batch.
    whole_payload: bool = False
    # When a re-normalisation stored it; None while it is open.
    resolved_seconds: int | None = None
    # The fraction of `received_seconds`, in nanoseconds (0 to 999,999,999).
    received_nanos: int = 0

    def received_time(self) -> Timestamp:
        """When it was received, as the reports made from it carry it."""
        return Timestamp(seconds=self.received_seconds, nanos=self.received_nanos)


class Transaction(Protocol):
    """One atomic, durable unit of writes (and the reads it depends on)."""

    def load_state(self, source: int, message_id: str) -> MessageState | None:
        """The merged state of a message, including writes earlier in this transaction."""

    def append(self, report: DeliveryReport, state: MessageState) -> int:
        """Adds `report` to the history and saves the message's new state; returns the cursor."""

    def quarantine(self, item: QuarantinedItem) -> None:
        """Keeps a rejected item."""

    def find_response(self, request_id: str) -> bytes | None:
        """The saved response of an earlier request with this id."""

    def save_response(self, request_id: str, response: bytes) -> None:
        """Saves a request's response for replays."""

    def resolve_quarantined(self, quarantine_id: int, seconds: int) -> None:
        """Marks a quarantined item as stored by a re-normalisation."""


class Store(Protocol):
    """A delivery-report store."""

    def transaction(self) -> AbstractContextManager[Transaction]:
        """A write transaction, committed durably when the block exits without error."""

    def messages(self, message_id: str, source: int = 0) -> list[DeliveryReport]:
        """The states of every message with this id (one per source), or []."""

    def history(self, message_id: str, source: int = 0) -> list[DeliveryReport]:
        """Every distinct report of those messages, in the order they were stored."""

    def messages_by(
        self, selector: Selector, value: str, source: int, after: int, limit: int, max_bytes: int
    ) -> MessagePage:
        """Messages whose `selector` field equals `value` (and from `source`, unless 0), after
        position `after`: a page of up to `limit`, with the totals of all that match. The page
        stops before the encoded states would pass `max_bytes` (it always holds one, if any
        match)."""

    def changes(self, after: int, limit: int) -> list[Change]:
        """Up to `limit` changes with cursor > `after`, in cursor order."""

    def latest_cursor(self) -> int:
        """The greatest committed cursor (0 when empty)."""

    def quarantined(
        self, after: int, limit: int, *, include_resolved: bool = True, ids: Sequence[int] = ()
    ) -> list[tuple[int, QuarantinedItem]]:
        """Quarantined items with id > `after` (and in `ids`, when given), oldest first."""

    def open_quarantine_count(self) -> int:
        """How many quarantined items are not resolved."""

    def check(self, *, write: bool = False) -> None:
        """Returns if the store can serve now, else raises StoreError saying why: it can read, and
        with `write` (from the writer thread only) it can commit a small durable write that changes
        nothing. Cheap: the health probe calls it every few seconds."""

    def close(self) -> None:
        """Releases every connection."""


__all__: Sequence[str] = [
    "Change",
    "ChangeFilter",
    "MessagePage",
    "QuarantinedItem",
    "ReadRunner",
    "Selector",
    "Store",
    "StoreError",
    "Transaction",
]
