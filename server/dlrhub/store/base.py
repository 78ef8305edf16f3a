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
import hashlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport
from dlrhub.merge import MessageState

T = TypeVar("T")


class ReadRunner(Protocol):
    """Runs a blocking call on a worker thread (a store call on a reader thread); the event loop
    awaits its result."""

    def __call__(self, call: Callable[[], T], /) -> Awaitable[T]: ...


class StoreError(Exception):
    """The store could not read or commit."""


# The greatest cursor any engine gives out: cursors fit a signed 64-bit integer.
MAX_CURSOR = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class CursorFormat:
    """A cursor as callers see it: an opaque string, `prefix` then the position in decimal. Each
    engine has its own prefix (SQLite none, so its cursors stay plain numbers), so a cursor given
    to the other engine is malformed rather than a position in another history."""

    prefix: str = ""

    def format(self, cursor: int) -> str:
        return f"{self.prefix}{cursor}"

    def parse(self, text: str) -> int | None:
        """The position `text` names, or None if this engine gave out no such cursor."""
        digits = text.removeprefix(self.prefix) if self.prefix else text
        if (self.prefix and not text.startswith(self.prefix)) or not digits.isascii():
            return None
        if not digits.isdigit() or len(digits) > len(str(MAX_CURSOR)) or int(digits) > MAX_CURSOR:
            return None
        return int(digits)


# Plain decimal cursors (SQLite's).
PLAIN_CURSORS = CursorFormat()


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


# The channels whose messages may be reported "seen" after they are delivered (Store.awaiting_seen).
SEEN_CHANNELS: frozenset[int] = frozenset({Channel.CHANNEL_VIBER, Channel.CHANNEL_WHATSAPP})


@dataclass(frozen=True, slots=True)
class AwaitingSeen:
    """A GMS message delivered on a channel of SEEN_CHANNELS and not seen yet (Store.awaiting_seen)."""

    message_id: str
    # When it was delivered: its state's event time, else its received time (Unix seconds).
    delivered_seconds: int
    # Where it is in the order of Store.awaiting_seen: pass (delivered_seconds, position) of the
    # last one of a page as `after` to continue.
    position: int

    @property
    def key(self) -> tuple[int, int]:
        """The `after` of Store.awaiting_seen that continues after this one."""
        return self.delivered_seconds, self.position


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
    # How many times it was received while open, and when last (None: received once).
    received_count: int = 1
    last_received_seconds: int | None = None
    last_received_nanos: int = 0
    # The channel of the endpoint it came to (a Channel value; 0: none said), for a report that
    # names none when it is run again.
    default_channel: int = 0
    # When DismissQuarantine dismissed it; None unless it was. An item is open while neither
    # `resolved_seconds` nor this is set.
    dismissed_seconds: int | None = None

    def received_time(self) -> Timestamp:
        """When it was received, as the reports made from it carry it."""
        return Timestamp(seconds=self.received_seconds, nanos=self.received_nanos)

    def last_received_time(self) -> Timestamp:
        """When it was last received."""
        if self.last_received_seconds is None:
            return self.received_time()
        return Timestamp(seconds=self.last_received_seconds, nanos=self.last_received_nanos)

    def digest(self) -> bytes:
        """What makes two items the same: format, whole payload or item, field, reason and text.
        An open item is kept once; the same item received again is counted (Transaction.quarantine)."""
        identity = hashlib.blake2b(digest_size=16)
        parts = [str(self.format), str(int(self.whole_payload)), self.field, self.reason, self.raw]
        if self.default_channel:  # items kept before endpoints had channels keep their digests
            parts.append(str(self.default_channel))
        for part in parts:
            encoded = part.encode()
            identity.update(len(encoded).to_bytes(8, "big"))
            identity.update(encoded)
        return identity.digest()


@dataclass(frozen=True, slots=True)
class Pruned:
    """What a prune deleted."""

    # Messages, with their states.
    messages: int = 0
    # Reports of their histories (with their raw text).
    reports: int = 0
    # Closed (resolved or dismissed) quarantined items.
    quarantined: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(
            self.messages + other.messages,
            self.reports + other.reports,
            self.quarantined + other.quarantined,
        )


@dataclass(frozen=True, slots=True)
class SavedResponse:
    """The answer to an Ingest call that carried a request id, kept for its retries."""

    # What the request was (a digest of its format and payload): a retry has the same.
    request_digest: bytes
    # The IngestResponse, serialised.
    response: bytes


@dataclass(frozen=True, slots=True)
class StagedBody:
    """A body fetched from a provider that hands each report out once, kept as it came (its bytes)
    from before it is read until its reports (or its quarantined items) are committed."""

    body: bytes
    # The answer's Content-Type, as given.
    content_type: str
    # The format it is read as (a Format value) and the channel of a report that names none.
    format: int
    default_channel: int
    # When it was fetched: the received time of its reports.
    received_seconds: int
    received_nanos: int = 0
    # Its id once staged (Transaction.stage); 0 before.
    id: int = 0

    def received_time(self) -> Timestamp:
        return Timestamp(seconds=self.received_seconds, nanos=self.received_nanos)


class Transaction(Protocol):
    """One atomic, durable unit of writes (and the reads it depends on).

    The committer writes a whole group of Ingest calls in one transaction: it first says which
    messages and reports the group is about (`prefetch`), then asks and writes report by report.
    Every read sees the writes made earlier in the same transaction, so an engine may answer the
    per-report calls from what `prefetch` loaded and send its writes at the commit, in bulk.
    """

    def prefetch(
        self,
        messages: Collection[tuple[int, str]],
        digests: Collection[bytes],
        request_ids: Collection[str] = (),
    ) -> None:
        """A hint: the messages (source, message id), the report digests and the request ids (of
        find_response) this transaction is about to ask about, for an engine to read (and lock, in a
        fixed order) in one go. Calls about others still work; an engine may ignore it."""

    def load_state(self, source: int, message_id: str) -> MessageState | None:
        """The merged state of a message, including writes earlier in this transaction."""

    def is_stored(self, digest: bytes) -> bool:
        """Whether a report with this digest (dlrhub.merge.digest) is in the history, including
        writes earlier in this transaction."""

    def append(self, report: DeliveryReport, digest: bytes, state: MessageState) -> int:
        """Adds `report` (whose digest is `digest`) to the history and saves its message's new
        state; returns the cursor. A digest is stored once: appending one that is stored already
        raises StoreError (a unique key, the safety net under `is_stored`)."""

    def quarantine(self, item: QuarantinedItem) -> None:
        """Keeps a rejected item; if the same item (QuarantinedItem.digest) is open already, counts
        it there instead (received_count, and its received time as the last)."""

    def find_response(self, request_id: str, since_seconds: int) -> SavedResponse | None:
        """The saved answer to a request with this id, if it was saved at `since_seconds` (Unix
        time) or later: older ones have expired."""

    def save_response(self, request_id: str, saved: SavedResponse, seconds: int) -> None:
        """Saves a request's answer, at `seconds` (Unix time), in place of an expired one."""

    def expire_responses(self, before_seconds: int, limit: int) -> int:
        """Deletes up to `limit` saved answers saved before `before_seconds`; returns how many."""

    def resolve_quarantined(self, quarantine_id: int, seconds: int) -> None:
        """Marks a quarantined item as stored by a re-normalisation."""

    def stage(self, staged: StagedBody) -> int:
        """Keeps a fetched body (its `id` is ignored) until `unstage`; returns its id, never reused.
        Committed in a transaction of its own, before the body is read, so that a crash cannot lose
        what a provider handed out."""

    def unstage(self, staged_id: int) -> None:
        """Drops a staged body: in the transaction that commits its reports (or quarantines it)."""

    def staged(self, after: int, limit: int) -> list[StagedBody]:
        """Up to `limit` staged bodies with id > `after`, oldest first: to replay at start."""

    def dismiss_quarantined(
        self, seconds: int, limit: int, *, ids: Sequence[int] = (), received_before: Timestamp | None = None
    ) -> int:
        """Dismisses, at `seconds` (Unix time), up to `limit` open items: those with an id in `ids`,
        or else those last received (QuarantinedItem.last_received_time) before `received_before`.
        Closed items are left as they are. Returns how many it dismissed."""

    def prune_messages(self, before_seconds: int, limit: int) -> Pruned:
        """Deletes up to `limit` messages in a final status (dlrhub.statuses.FINAL) whose last change
        (the received time of their latest stored report, to the second) is before `before_seconds`,
        with every report of their history; raises the pruned-through position (Store.pruned_through)
        to the greatest cursor deleted. A later report of such a message starts it afresh."""

    def prune_quarantined(self, before_seconds: int, limit: int) -> int:
        """Deletes up to `limit` quarantined items resolved or dismissed before `before_seconds`;
        returns how many. Open items are never deleted."""


class Store(Protocol):
    """A delivery-report store."""

    # How this engine's cursors are written for callers (Ingest results, Stream) and read back.
    cursor_format: CursorFormat

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
        """Up to `limit` changes with cursor > `after`, in cursor order: only changes below which
        no change can commit any more, so a reader resuming after the last one it got skips
        nothing (a change committed later always has a greater cursor than those returned)."""

    def awaiting_seen(self, since_seconds: int, after: tuple[int, int], limit: int) -> list[AwaitingSeen]:
        """GMS messages whose state is DELIVERED on a channel of SEEN_CHANNELS, delivered at
        `since_seconds` (Unix time) or later: up to `limit`, ordered by (delivered_seconds,
        position), after `after` ((0, 0) for the first page; AwaitingSeen.key of the last one for
        the next). Served by an index: a page costs about its own size, however many messages the
        store holds. The GMS seen fetcher asks GMS about these."""

    def latest_cursor(self) -> int:
        """The greatest cursor `changes` returns now (0 when empty), or the greatest pruned
        (`pruned_through`) if that is greater and no open transaction can still commit below it:
        every change at or below it is committed and visible, or pruned, and no other change will
        ever appear at or below it."""

    def committed_cursor(self) -> int:
        """The greatest cursor of any committed change (0 when empty). It equals `latest_cursor`
        with one writer; with several (PostgreSQL), it may be above it for a moment, while a
        transaction holding a smaller cursor is still open. An Ingest answer's cursor is at or
        below it as soon as the answer is given."""

    @property
    def shared(self) -> bool:
        """Whether other processes may write this store too. Then this process's commits are not all
        there is: live changes come from reading the store (feed/follower.py), not from the commits."""

    def changed(self) -> None:
        """Tells the other processes sharing the store that changes were committed: called by the
        committer after each commit that stored any. Coalesced, and never waits for them to hear it;
        nothing to do where no other process shares the store."""

    def wait_changes(self, timeout: float) -> bool:
        """Blocks until another process tells of committed changes (True) or `timeout` seconds pass
        (False). Raises StoreError when it cannot listen; the caller retries (and polls meanwhile)."""

    def pruned_through(self) -> int:
        """The greatest cursor ever pruned (Transaction.prune_messages), 0 if none was: a Stream
        resuming after an earlier cursor would miss changes."""

    def quarantined(
        self, after: int, limit: int, *, include_resolved: bool = True, ids: Sequence[int] = ()
    ) -> list[tuple[int, QuarantinedItem]]:
        """Quarantined items with id > `after` (and in `ids`, when given), oldest first; without
        `include_resolved`, open items only (neither resolved nor dismissed)."""

    def open_quarantine_count(self) -> int:
        """How many quarantined items are open: neither resolved nor dismissed."""

    def check(self, *, write: bool = False) -> None:
        """Returns if the store can serve now, else raises StoreError saying why: it can read, and
        with `write` (from the writer thread only) it can commit a small durable write that changes
        nothing. Cheap: the health probe calls it every few seconds."""

    def close(self) -> None:
        """Releases every connection."""


__all__: Sequence[str] = [
    "MAX_CURSOR",
    "PLAIN_CURSORS",
    "SEEN_CHANNELS",
    "AwaitingSeen",
    "Change",
    "ChangeFilter",
    "CursorFormat",
    "MessagePage",
    "Pruned",
    "QuarantinedItem",
    "ReadRunner",
    "SavedResponse",
    "Selector",
    "StagedBody",
    "Store",
    "StoreError",
    "Transaction",
]
