"""The gRPC servicer: each request into calls on the write path, the store and the feed, and their
results into a response. It raises domain errors (errors.py); the per-call interceptor
(observability/calls.py) turns whatever a call raises into its status."""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf.message import Message

from deliveryreport.v1 import delivery_report_service_pb2_grpc as service_grpc
from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    DismissQuarantineRequest,
    DismissQuarantineResponse,
    GetMessageRequest,
    GetMessageResponse,
    IngestRequest,
    IngestResponse,
    IngestResponseView,
    ItemError,
    ListMessagesRequest,
    ListMessagesResponse,
    ListQuarantineRequest,
    ListQuarantineResponse,
    PruneMessagesRequest,
    PruneMessagesResponse,
    RenormaliseQuarantineRequest,
    RenormaliseQuarantineResponse,
    StatusCount,
    StreamBatchesRequest,
    StreamBatchesResponse,
    StreamHeartbeat,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2 import QuarantinedItem as QuarantinedItemMessage
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.errors import (
    DlrhubError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    invalid_argument,
)
from dlrhub.feed.encoding import EncodedChange, batches
from dlrhub.feed.follow import CursorPruned, Heartbeat, follow_batches
from dlrhub.feed.hub import Hub
from dlrhub.observability.calls import note
from dlrhub.store.base import ChangeFilter, CursorFormat, QuarantinedItem, ReadRunner, Selector, Store
from dlrhub.transport.pages import MAX_PAGE_BYTES, decode_page_token, encode_page_token, page_size
from dlrhub.write import quarantine
from dlrhub.write.committer import Committer
from dlrhub.write.retention import Retention
from dlrhub.write.submission import in_view, is_wholly_rejected
from dlrhub.write.writer import AnswerTooLarge, RequestIdReused, TooManyItems, Writer

Context = grpc.aio.ServicerContext[Any, Any]
# Heartbeat intervals: when none is given, and the range one may be (seconds).
DEFAULT_HEARTBEAT_SECONDS = 15.0
MIN_HEARTBEAT_SECONDS = 0.1
MAX_HEARTBEAT_SECONDS = 3600.0
MAX_RENORMALISE_IDS = 10_000
MAX_REQUEST_ID_LENGTH = 128
# The largest FULL Ingest answer: a gRPC client's default receive limit (4 MiB), less a margin.
MAX_FULL_ANSWER_BYTES = (4 << 20) - (64 << 10)
_HEARTBEAT = StreamHeartbeat()


class DeliveryReportService(service_grpc.DeliveryReportServiceServicer):
    """Ingest, GetMessage, ListMessages, Stream, the quarantine and retention."""

    def __init__(
        self,
        *,
        writer: Writer,
        store: Store,
        hub: Hub,
        read: ReadRunner,
        committer: Committer,
        retention: Retention,
        clock: Callable[[], int],
        max_streams: int = 1000,
    ) -> None:
        self._writer = writer
        self._store = store
        self._hub = hub
        self._read = read
        self._committer = committer
        self._retention = retention
        self._clock = clock
        self._cursors = store.cursor_format
        self._max_streams = max_streams

    async def Ingest(self, request: IngestRequest, context: Context) -> IngestResponse:
        return await self._ingest(request)

    async def GetMessage(self, request: GetMessageRequest, context: Context) -> GetMessageResponse:
        return await self._get_message(request)

    async def ListMessages(self, request: ListMessagesRequest, context: Context) -> ListMessagesResponse:
        return await self._list_messages(request)

    async def ListQuarantine(
        self, request: ListQuarantineRequest, context: Context
    ) -> ListQuarantineResponse:
        return await self._list_quarantine(request)

    async def RenormaliseQuarantine(
        self, request: RenormaliseQuarantineRequest, context: Context
    ) -> RenormaliseQuarantineResponse:
        return await self._renormalise_quarantine(request)

    async def DismissQuarantine(
        self, request: DismissQuarantineRequest, context: Context
    ) -> DismissQuarantineResponse:
        return await self._dismiss_quarantine(request)

    async def PruneMessages(self, request: PruneMessagesRequest, context: Context) -> PruneMessagesResponse:
        return await self._prune_messages(request)

    async def Stream(  # type: ignore[override]  # bytes as well: see transport/handlers.py
        self, request: StreamRequest, context: Context
    ) -> AsyncIterator[StreamResponse | bytes]:
        """Yields heartbeats as messages and changes already encoded (see transport/handlers.py)."""
        try:
            async for item in await self._follow(request):
                if isinstance(item, Heartbeat):
                    yield StreamResponse(cursor=self._cursors.format(item.cursor), heartbeat=_HEARTBEAT)
                else:
                    for change in item:
                        yield change.response
        except CursorPruned as error:
            raise self._cursor_pruned(error.after, error.oldest) from None

    async def StreamBatches(  # type: ignore[override]  # bytes as well: see transport/handlers.py
        self, request: StreamBatchesRequest, context: Context
    ) -> AsyncIterator[StreamBatchesResponse | bytes]:
        """Stream's feed with the changes ready together in one message, encoded."""
        try:
            async for item in await self._follow(request.stream):
                if isinstance(item, Heartbeat):
                    heartbeat = StreamResponse(cursor=self._cursors.format(item.cursor), heartbeat=_HEARTBEAT)
                    yield StreamBatchesResponse(responses=[heartbeat])
                else:
                    for batch in batches(item):
                        yield batch
        except CursorPruned as error:
            raise self._cursor_pruned(error.after, error.oldest) from None
        except DlrhubError as error:
            # The fields are those of the StreamRequest inside this request.
            error.violations = [
                replace(violation, field=f"stream.{violation.field}") for violation in error.violations
            ]
            raise

    # Ingest.

    async def _ingest(self, request: IngestRequest) -> IngestResponse:
        _check_request_id(request.request_id)  # before it is logged or stored anywhere
        body = request.WhichOneof("body")
        if body is None:
            raise invalid_argument(
                "payload",
                "set payload, gms or sent_sms_report",
                ErrorReason.MISSING_PAYLOAD,
                message="nothing to ingest: set payload, gms or sent_sms_report",
                violation_reason=ErrorReason.MISSING_FIELD,
            )
        if request.request_id:
            note(request_id=request.request_id)
        full = request.view == IngestResponseView.INGEST_RESPONSE_VIEW_FULL
        try:
            ingested = await self._writer.ingest(
                getattr(request, body),  # the payload's text, or typed reports
                request.format,
                request.request_id,
                max_full_answer_bytes=MAX_FULL_ANSWER_BYTES if full else None,
            )
        except RequestIdReused as error:
            raise invalid_argument(
                "request_id",
                str(error),
                ErrorReason.REQUEST_ID_REUSED,
                message=str(error),
                violation_reason=ErrorReason.REQUEST_ID_REUSED,
                metadata={"request_id": error.request_id},
            ) from None
        except TooManyItems as error:
            raise too_many_items(body, error) from None
        except AnswerTooLarge as error:
            raise invalid_argument(
                "view",
                f"FULL would answer about {error.size} bytes, over the {error.limit}-byte limit",
                ErrorReason.RESPONSE_TOO_LARGE,
                message=f"{error}: nothing was stored; ask for the BASIC view, or send fewer items",
                violation_reason=ErrorReason.RESPONSE_TOO_LARGE,
                metadata={"response_bytes": str(error.size), "max_response_bytes": str(error.limit)},
            ) from None
        rejection = ingested.rejection
        if rejection is not None:
            raise invalid_argument(
                rejection.field or body,
                rejection.description,
                rejection.reason,
                message=rejection.description,
                violation_reason=rejection.reason,
            )
        response = ingested.response
        note(
            accepted=response.accepted_count,
            duplicate=response.duplicate_count,
            rejected=response.rejected_count,
        )
        if is_wholly_rejected(response):
            raise InvalidArgument(
                f"no valid report: all {response.rejected_count} items were rejected",
                ErrorReason.ALL_ITEMS_REJECTED,
                violations=[
                    FieldViolation(
                        result.error.field, result.error.description, ErrorReason.Value(result.error.reason)
                    )
                    for result in response.results
                ],
            )
        return in_view(response, full)

    # GetMessage and ListMessages.

    async def _get_message(self, request: GetMessageRequest) -> GetMessageResponse:
        message_id, source = request.message_id, request.source
        if not message_id:
            raise invalid_argument(
                "message_id",
                "is required",
                ErrorReason.MISSING_FIELD,
                violation_reason=ErrorReason.MISSING_FIELD,
            )

        def lookup() -> tuple[list[DeliveryReport], list[DeliveryReport]]:
            states = self._store.messages(message_id, source)
            history = self._store.history(message_id, source) if states and request.include_history else []
            return states, history

        states, history = await self._read(lookup)  # one trip to a reader thread
        if not states:
            raise NotFound(
                f"no message with message_id {message_id!r}",
                ErrorReason.MESSAGE_NOT_FOUND,
                metadata={"message_id": message_id},
            )
        shown = _within(history, MAX_PAGE_BYTES)
        return GetMessageResponse(
            messages=states, history=history[:shown], history_truncated=shown < len(history)
        )

    async def _list_messages(self, request: ListMessagesRequest) -> ListMessagesResponse:
        selector = request.WhichOneof("selector")
        if selector is None:
            raise invalid_argument(
                "bulk_id",
                "set bulk_id or reference",
                ErrorReason.MISSING_SELECTOR,
                message="set bulk_id or reference",
                violation_reason=ErrorReason.MISSING_FIELD,
            )
        value: str = getattr(request, selector)
        if not value:
            raise invalid_argument(selector, "must not be empty", ErrorReason.EMPTY_SELECTOR)
        size = page_size(request.page_size)
        source = request.source
        after = decode_page_token(request.page_token, selector, value, source) if request.page_token else 0
        by = Selector(selector)
        page = await self._read(
            lambda: self._store.messages_by(by, value, source, after, size, MAX_PAGE_BYTES)
        )
        response = ListMessagesResponse(messages=page.states, total_size=page.total)
        if page.next_after is not None:
            response.next_page_token = encode_page_token(selector, value, source, page.next_after)
        if selector == "bulk_id":
            response.status_counts.extend(
                StatusCount(status=status, count=count)  # type: ignore[arg-type]  # stored enum values
                for status, count in sorted(page.status_counts.items())
            )
        return response

    # Quarantine.

    async def _list_quarantine(self, request: ListQuarantineRequest) -> ListQuarantineResponse:
        size = page_size(request.page_size)
        scope = "all" if request.include_resolved else "open"
        after = decode_page_token(request.page_token, "quarantine", scope, 0) if request.page_token else 0
        rows = await self._read(
            lambda: self._store.quarantined(after, size + 1, include_resolved=request.include_resolved)
        )
        open_count = await self._read(self._store.open_quarantine_count)
        items = [_quarantined_item(quarantine_id, item) for quarantine_id, item in rows[:size]]
        shown = _within(items, MAX_PAGE_BYTES)
        response = ListQuarantineResponse(items=items[:shown], open_count=open_count)
        if shown < len(rows):
            response.next_page_token = encode_page_token("quarantine", scope, 0, rows[shown - 1][0])
        return response

    async def _renormalise_quarantine(
        self, request: RenormaliseQuarantineRequest
    ) -> RenormaliseQuarantineResponse:
        _check_id_count(request.ids, "give none to re-run every open item")
        return await quarantine.renormalise(self._writer, self._store, self._read, request.ids)

    async def _dismiss_quarantine(self, request: DismissQuarantineRequest) -> DismissQuarantineResponse:
        by_age = request.HasField("received_before")
        if bool(request.ids) == by_age:
            raise invalid_argument(
                "ids",
                "set either ids or received_before" if by_age else "set ids or received_before",
                ErrorReason.INVALID_VALUE if by_age else ErrorReason.MISSING_FIELD,
                message="give the ids to dismiss or received_before, not both"
                if by_age
                else "give the ids to dismiss, or received_before to dismiss by age",
                violation_reason=ErrorReason.INVALID_VALUE if by_age else ErrorReason.MISSING_FIELD,
            )
        _check_id_count(request.ids, "or dismiss by received_before")
        return await quarantine.dismiss(
            self._committer,
            self._store,
            self._read,
            self._clock,
            ids=request.ids,
            received_before=request.received_before if by_age else None,
        )

    # Retention.

    async def _prune_messages(self, request: PruneMessagesRequest) -> PruneMessagesResponse:
        if request.HasField("older_than"):
            older_than = request.older_than
            if older_than.seconds < 1 or older_than.nanos < 0:
                raise invalid_argument("older_than", "must be at least 1 second", ErrorReason.INVALID_VALUE)
            seconds = older_than.seconds
        elif self._retention.retention_seconds is not None:
            seconds = self._retention.retention_seconds
        else:
            raise invalid_argument(
                "older_than",
                "is required: the server has no retention (DLRHUB_RETENTION)",
                ErrorReason.MISSING_FIELD,
                violation_reason=ErrorReason.MISSING_FIELD,
            )
        pruned = (await self._retention.prune(seconds)).total
        note(pruned_messages=pruned.messages)
        pruned_through = await self._read(self._store.pruned_through)
        return PruneMessagesResponse(
            message_count=pruned.messages,
            report_count=pruned.reports,
            quarantined_count=pruned.quarantined,
            pruned_through_cursor=self._cursors.format(pruned_through),
        )

    # Stream.

    def _cursor_pruned(self, after: int, oldest: int) -> OutOfRange:
        """OUT_OF_RANGE CURSOR_PRUNED: changes after `after` were pruned, through `oldest`."""
        cursor, oldest_cursor = self._cursors.format(after), self._cursors.format(oldest)
        return OutOfRange(
            f"changes after cursor {cursor} were pruned by retention (through cursor {oldest_cursor}):"
            f" re-read the current states, then resume after cursor {oldest_cursor}",
            ErrorReason.CURSOR_PRUNED,
            metadata={"cursor": cursor, "oldest_cursor": oldest_cursor},
        )

    async def _follow(self, request: StreamRequest) -> AsyncIterator[list[EncodedChange] | Heartbeat]:
        """The feed the request asks for, once the request is checked (raises DlrhubError)."""
        heartbeat = _heartbeat_seconds(request)
        after: int | None = None
        pruned = 0  # where retention had pruned through when the stream started
        start = request.WhichOneof("start")
        if start == "cursor":
            after = _parse_cursor(request.cursor, self._cursors)
            # Not latest_cursor: with several writers, a cursor an Ingest just answered may be above it
            # for a moment (store/base.py), and the stream delivers up to it soon.
            store = self._store
            latest, pruned = await self._read(lambda: (store.committed_cursor(), store.pruned_through()))
            if after > latest:
                text = self._cursors.format(latest)
                raise OutOfRange(
                    f"cursor {request.cursor} is ahead of the latest stored change ({text})",
                    ErrorReason.CURSOR_AHEAD,
                    metadata={"cursor": request.cursor, "latest_cursor": text},
                )
            if after < pruned:
                raise self._cursor_pruned(after, pruned)
        else:  # from the beginning, or from now: what was pruned before it started is not its loss
            after = 0 if start == "from_beginning" and request.from_beginning else None
            pruned = await self._read(self._store.pruned_through)
        change_filter = ChangeFilter(
            bulk_id=request.bulk_id,
            message_ids=frozenset(request.message_ids),
            statuses=frozenset(request.statuses),
            channels=frozenset(request.channels),
            source=request.source,
        )
        # Checked after the last await before follow_batches() subscribes: no stream starts once the
        # hub has closed (it would stay open until the server's grace period ran out), and concurrent
        # calls cannot all pass the limit.
        if self._hub.closed:
            raise Unavailable(
                "the server is shutting down: retry, resuming after the last cursor you received",
                ErrorReason.SHUTTING_DOWN,
            )
        if self._hub.subscriber_count >= self._max_streams:
            raise ResourceExhausted(
                f"too many open streams: at most {self._max_streams}; retry later",
                ErrorReason.TOO_MANY_STREAMS,
                metadata={"max_streams": str(self._max_streams)},
            )
        return follow_batches(
            self._store, self._hub, self._read, change_filter, after, heartbeat, pruned=pruned
        )


def _check_id_count(ids: Sequence[int], otherwise: str) -> None:
    """Raises InvalidArgument (TOO_MANY_IDS) for more than MAX_RENORMALISE_IDS ids."""
    if len(ids) > MAX_RENORMALISE_IDS:
        raise invalid_argument(
            "ids",
            f"at most {MAX_RENORMALISE_IDS} ids",
            ErrorReason.TOO_MANY_IDS,
            message=f"at most {MAX_RENORMALISE_IDS} ids per call; {otherwise}",
            metadata={"max_ids": str(MAX_RENORMALISE_IDS)},
        )


def too_many_items(field: str, error: TooManyItems) -> InvalidArgument:
    """INVALID_ARGUMENT TOO_MANY_ITEMS for the body in `field` (decoding stopped at one too many)."""
    return invalid_argument(
        field,
        str(error),
        ErrorReason.TOO_MANY_ITEMS,
        message=str(error),
        violation_reason=ErrorReason.TOO_MANY_ITEMS,
        metadata={"items": str(error.limit + 1), "max_items": str(error.limit)},
    )


def _quarantined_item(quarantine_id: int, item: QuarantinedItem) -> QuarantinedItemMessage:
    message = QuarantinedItemMessage(
        id=quarantine_id,
        received_time=item.received_time(),
        request_id=item.request_id,
        format=item.format,  # type: ignore[arg-type]  # a stored Format value
        whole_payload=item.whole_payload,
        raw=item.raw,
        error=ItemError(field=item.field, reason=item.reason, description=item.description),
        received_count=item.received_count,
        last_received_time=item.last_received_time(),
    )
    if item.resolved_seconds is not None:
        message.resolved_time.seconds = item.resolved_seconds
    if item.dismissed_seconds is not None:
        message.dismissed_time.seconds = item.dismissed_seconds
    return message


def _check_request_id(request_id: str) -> None:
    """A request id is at most MAX_REQUEST_ID_LENGTH characters, none of them a control character."""
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise invalid_argument(
            "request_id",
            f"is {len(request_id)} characters long; at most {MAX_REQUEST_ID_LENGTH} are allowed",
            ErrorReason.INVALID_REQUEST_ID,
            metadata={"max_length": str(MAX_REQUEST_ID_LENGTH)},
        )
    if any(unicodedata.category(character) == "Cc" for character in request_id):
        raise invalid_argument(
            "request_id", "must not contain control characters", ErrorReason.INVALID_REQUEST_ID
        )


def _within(messages: Sequence[Message], max_bytes: int) -> int:
    """How many of `messages`, from the first, fit in `max_bytes` encoded (at least one)."""
    size = 0
    for count, message in enumerate(messages):
        size += message.ByteSize()
        if count and size > max_bytes:
            return count
    return len(messages)


def _heartbeat_seconds(request: StreamRequest) -> float:
    """The heartbeat interval a request asks for, in seconds; raises InvalidArgument outside the range."""
    if not request.HasField("heartbeat_interval"):
        return DEFAULT_HEARTBEAT_SECONDS
    interval = request.heartbeat_interval
    seconds = interval.seconds + interval.nanos / 1e9
    # A Duration's seconds and nanos share their sign, and nanos are under a second.
    valid = abs(interval.nanos) < 1_000_000_000 and interval.seconds * interval.nanos >= 0
    if not valid or not MIN_HEARTBEAT_SECONDS <= seconds <= MAX_HEARTBEAT_SECONDS:
        low, high, default = MIN_HEARTBEAT_SECONDS, MAX_HEARTBEAT_SECONDS, DEFAULT_HEARTBEAT_SECONDS
        raise invalid_argument(
            "heartbeat_interval",
            f"must be from {low:g}s to {high:g}s (unset: {default:g}s)",
            ErrorReason.INVALID_HEARTBEAT_INTERVAL,
        )
    return seconds


def _parse_cursor(cursor: str, cursors: CursorFormat) -> int:
    """The position a cursor names (INVALID_ARGUMENT for a malformed one, or another engine's)."""
    after = cursors.parse(cursor)
    if after is None:
        raise invalid_argument(
            "cursor",
            "not a cursor dlrhub gave out",
            ErrorReason.INVALID_CURSOR,
            message=f"malformed cursor {cursor!r}: pass a cursor from a StreamResponse or an IngestResult",
        )
    return after
