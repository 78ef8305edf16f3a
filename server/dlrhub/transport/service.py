"""The gRPC servicer: each request into calls on the write path, the store and the feed, and their
results into a response. It raises domain errors (errors.py); the per-call interceptor
(observability/calls.py) turns whatever a call raises into its status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from deliveryreport.v1 import delivery_report_service_pb2_grpc as service_grpc
from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    FetchRequest,
    FetchResponse,
    IngestRequest,
    IngestResponse,
    ItemError,
    ListQuarantineRequest,
    ListQuarantineResponse,
    RenormaliseQuarantineRequest,
    RenormaliseQuarantineResponse,
    StatusCount,
    StreamBatchesRequest,
    StreamBatchesResponse,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2 import QuarantinedItem as QuarantinedItemMessage
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
from dlrhub.feed.encoding import StreamEncoder
from dlrhub.feed.follow import Heartbeat, follow_batches
from dlrhub.feed.hub import Hub
from dlrhub.observability.calls import note
from dlrhub.store.base import Change, ChangeFilter, QuarantinedItem, ReadRunner, Selector, Store
from dlrhub.transport.pages import decode_page_token, encode_page_token, page_size
from dlrhub.write import quarantine
from dlrhub.write.submission import is_wholly_rejected
from dlrhub.write.writer import TooManyItems, Writer

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_HEARTBEAT_SECONDS = 15
MAX_RENORMALISE_IDS = 10_000


class DeliveryReportService(service_grpc.DeliveryReportServiceServicer):
    """Ingest, Fetch, Stream, and the quarantine."""

    def __init__(
        self, *, writer: Writer, store: Store, hub: Hub, read: ReadRunner, max_streams: int = 1000
    ) -> None:
        self._writer = writer
        self._store = store
        self._hub = hub
        self._read = read
        self._max_streams = max_streams
        self._encode = StreamEncoder(size=hub.capacity)

    async def Ingest(self, request: IngestRequest, context: Context) -> IngestResponse:
        return await self._ingest(request)

    async def Fetch(self, request: FetchRequest, context: Context) -> FetchResponse:
        return await self._fetch(request)

    async def ListQuarantine(
        self, request: ListQuarantineRequest, context: Context
    ) -> ListQuarantineResponse:
        return await self._list_quarantine(request)

    async def RenormaliseQuarantine(
        self, request: RenormaliseQuarantineRequest, context: Context
    ) -> RenormaliseQuarantineResponse:
        return await self._renormalise_quarantine(request)

    async def Stream(  # type: ignore[override]  # bytes as well: see transport/handlers.py
        self, request: StreamRequest, context: Context
    ) -> AsyncIterator[StreamResponse | bytes]:
        """Yields heartbeats as messages and changes already encoded (see transport/handlers.py)."""
        async for item in await self._follow(request):
            if isinstance(item, Heartbeat):
                yield StreamResponse(cursor=str(item.cursor), heartbeat=True)
            else:
                for change in item:
                    yield self._encode.response(change)

    async def StreamBatches(  # type: ignore[override]  # bytes as well: see transport/handlers.py
        self, request: StreamBatchesRequest, context: Context
    ) -> AsyncIterator[StreamBatchesResponse | bytes]:
        """Stream's feed with the changes ready together in one message, encoded."""
        try:
            async for item in await self._follow(request.stream):
                if isinstance(item, Heartbeat):
                    heartbeat = StreamResponse(cursor=str(item.cursor), heartbeat=True)
                    yield StreamBatchesResponse(responses=[heartbeat])
                else:
                    for batch in self._encode.batches(item):
                        yield batch
        except DlrhubError as error:
            # The fields are those of the StreamRequest inside this request.
            error.violations = [
                replace(violation, field=f"stream.{violation.field}") for violation in error.violations
            ]
            raise

    # Ingest.

    async def _ingest(self, request: IngestRequest) -> IngestResponse:
        body = request.WhichOneof("body")
        if body is None:
            raise invalid_argument(
                "payload",
                "set payload, gms or sent_sms_report",
                "MISSING_PAYLOAD",
                message="nothing to ingest: set payload, gms or sent_sms_report",
                violation_reason="MISSING_FIELD",
            )
        if request.request_id:
            note(request_id=request.request_id)
        try:
            ingested = await self._writer.ingest(getattr(request, body), request.format, request.request_id)
        except TooManyItems as error:
            raise too_many_items(body, error) from None
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
                "ALL_ITEMS_REJECTED",
                violations=[
                    FieldViolation(result.error.field, result.error.description, result.error.reason)
                    for result in response.results
                ],
            )
        return response

    # Fetch.

    async def _fetch(self, request: FetchRequest) -> FetchResponse:
        selector = request.WhichOneof("selector")
        if selector is None:
            raise invalid_argument(
                "message_id",
                "set one of message_id, bulk_id or reference",
                "MISSING_SELECTOR",
                message="set one of message_id, bulk_id or reference",
                violation_reason="MISSING_FIELD",
            )
        value: str = getattr(request, selector)
        if not value:
            raise invalid_argument(selector, "must not be empty", "EMPTY_SELECTOR")
        size = page_size(request.page_size)
        source = request.source
        if selector == "message_id":

            def lookup() -> tuple[list[DeliveryReport], list[DeliveryReport]]:
                states = self._store.messages(value, source)
                history = self._store.history(value, source) if states and request.include_history else []
                return states, history

            states, history = await self._read(lookup)  # one trip to a reader thread
            if not states:
                raise NotFound(
                    f"no message with message_id {value!r}",
                    "MESSAGE_NOT_FOUND",
                    metadata={"message_id": value},
                )
            return FetchResponse(reports=states, history=history)

        after = decode_page_token(request.page_token, selector, value, source) if request.page_token else 0
        by = Selector(selector)
        page = await self._read(lambda: self._store.messages_by(by, value, source, after, size))
        response = FetchResponse(reports=page.states, total_size=page.total)
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
        response = ListQuarantineResponse(
            items=[_quarantined_item(quarantine_id, item) for quarantine_id, item in rows[:size]],
            open_count=open_count,
        )
        if len(rows) > size:
            response.next_page_token = encode_page_token("quarantine", scope, 0, rows[size - 1][0])
        return response

    async def _renormalise_quarantine(
        self, request: RenormaliseQuarantineRequest
    ) -> RenormaliseQuarantineResponse:
        if len(request.ids) > MAX_RENORMALISE_IDS:
            raise invalid_argument(
                "ids",
                f"at most {MAX_RENORMALISE_IDS} ids",
                "TOO_MANY_IDS",
                message=f"at most {MAX_RENORMALISE_IDS} ids per call; give none to re-run every open item",
                metadata={"max_ids": str(MAX_RENORMALISE_IDS)},
            )
        return await quarantine.renormalise(self._writer, self._store, self._read, request.ids)

    # Stream.

    async def _follow(self, request: StreamRequest) -> AsyncIterator[list[Change] | Heartbeat]:
        """The feed the request asks for, once the request is checked (raises DlrhubError)."""
        if request.heartbeat_seconds < 0:
            raise invalid_argument("heartbeat_seconds", "must not be negative", "INVALID_HEARTBEAT")
        after: int | None = None
        start = request.WhichOneof("start")
        if start == "cursor":
            after = _parse_cursor(request.cursor)
            latest = await self._read(self._store.latest_cursor)
            if after > latest:
                raise OutOfRange(
                    f"cursor {after} is ahead of the latest stored change ({latest})",
                    "CURSOR_AHEAD",
                    metadata={"cursor": request.cursor, "latest_cursor": str(latest)},
                )
        elif start == "from_beginning" and request.from_beginning:
            after = 0
        change_filter = ChangeFilter(
            bulk_id=request.bulk_id,
            message_ids=frozenset(request.message_ids),
            statuses=frozenset(request.statuses),
            channels=frozenset(request.channels),
            source=request.source,
        )
        heartbeat = request.heartbeat_seconds or DEFAULT_HEARTBEAT_SECONDS
        # Checked after the last await before follow_batches() subscribes: no stream starts once the
        # hub has closed (it would stay open until the server's grace period ran out), and concurrent
        # calls cannot all pass the limit.
        if self._hub.closed:
            raise Unavailable(
                "the server is shutting down: retry, resuming after the last cursor you received",
                "SHUTTING_DOWN",
            )
        if self._hub.subscriber_count >= self._max_streams:
            raise ResourceExhausted(
                f"too many open streams: at most {self._max_streams}; retry later",
                "TOO_MANY_STREAMS",
                metadata={"max_streams": str(self._max_streams)},
            )
        return follow_batches(self._store, self._hub, self._read, change_filter, after, heartbeat)


def too_many_items(field: str, error: TooManyItems) -> InvalidArgument:
    """INVALID_ARGUMENT TOO_MANY_ITEMS for the body in `field`."""
    return invalid_argument(
        field,
        str(error),
        "TOO_MANY_ITEMS",
        message=str(error),
        violation_reason="TOO_MANY_ITEMS",
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
    )
    if item.resolved_seconds is not None:
        message.resolved_time.seconds = item.resolved_seconds
    return message


def _parse_cursor(cursor: str) -> int:
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 19:
        raise invalid_argument(
            "cursor",
            "not a cursor dlrhub gave out",
            "INVALID_CURSOR",
            message=f"malformed cursor {cursor!r}: pass a cursor from a StreamResponse or an IngestResult",
        )
    return int(cursor)
