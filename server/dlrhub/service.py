"""The gRPC servicer: requests into calls on the domain objects, results into responses."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from deliveryreport.v1 import delivery_report_service_pb2_grpc as service_grpc
from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    FetchRequest,
    FetchResponse,
    IngestRequest,
    IngestResponse,
    StatusCount,
    StreamRequest,
    StreamResponse,
)
from dlrhub.errors import (
    DlrhubError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    to_status,
)
from dlrhub.follow import Heartbeat, follow
from dlrhub.hub import Hub
from dlrhub.ingest import is_wholly_rejected
from dlrhub.intake import Intake, TooManyItems
from dlrhub.normalise import typed_payload
from dlrhub.store.base import ChangeFilter, Store, StoreError

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_HEARTBEAT_SECONDS = 15


class DeliveryReportService(service_grpc.DeliveryReportServiceServicer):
    """Ingest, Fetch and Stream."""

    def __init__(
        self, *, intake: Intake, store: Store, hub: Hub, reads: Executor, max_streams: int = 1000
    ) -> None:
        self._intake = intake
        self._store = store
        self._hub = hub
        self._reads = reads
        self._max_streams = max_streams

    async def Ingest(
        self, request: IngestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> IngestResponse:
        try:
            return await self._ingest(request)
        except DlrhubError as error:
            await _abort(context, error)
            raise  # unreachable: abort raises

    async def Fetch(
        self, request: FetchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> FetchResponse:
        try:
            return await self._fetch(request)
        except DlrhubError as error:
            await _abort(context, error)
            raise

    async def Stream(
        self, request: StreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[StreamResponse]:
        try:
            async for response in self._stream(request):
                yield response
        except DlrhubError as error:
            await _abort(context, error)

    # Ingest.

    async def _ingest(self, request: IngestRequest) -> IngestResponse:
        body = request.WhichOneof("body")
        if body is None:
            raise InvalidArgument(
                "nothing to ingest: set payload, gms or sent_sms_report",
                "MISSING_PAYLOAD",
                violations=[
                    FieldViolation("payload", "set payload, gms or sent_sms_report", "MISSING_FIELD")
                ],
            )
        if body == "payload":
            payload, format = request.payload, request.format
        else:
            payload, format = typed_payload(request.gms if body == "gms" else request.sent_sms_report)
        try:
            ingested = await self._intake.ingest(payload, format, request.request_id)
        except TooManyItems as error:
            raise InvalidArgument(
                str(error),
                "TOO_MANY_ITEMS",
                violations=[FieldViolation(body, str(error), "TOO_MANY_ITEMS")],
                metadata={"items": str(error.count), "max_items": str(error.limit)},
            ) from None
        except StoreError as error:
            raise Unavailable(
                "the store could not commit the reports; retry with the same request_id", "STORE_UNAVAILABLE"
            ) from error
        rejection = ingested.rejection
        if rejection is not None:
            raise InvalidArgument(
                rejection.description,
                rejection.reason,
                violations=[FieldViolation(rejection.field or body, rejection.description, rejection.reason)],
            )
        response = ingested.response
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
            raise InvalidArgument(
                "set one of message_id, bulk_id or reference",
                "MISSING_SELECTOR",
                violations=[
                    FieldViolation(
                        "message_id", "set one of message_id, bulk_id or reference", "MISSING_FIELD"
                    )
                ],
            )
        value: str = getattr(request, selector)
        if not value:
            raise InvalidArgument(
                f"{selector} must not be empty",
                "EMPTY_SELECTOR",
                violations=[FieldViolation(selector, "must not be empty", "INVALID_VALUE")],
            )
        if request.page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative",
                "INVALID_PAGE_SIZE",
                violations=[FieldViolation("page_size", "must not be negative", "INVALID_VALUE")],
            )
        source = request.source
        if selector == "message_id":
            states = await self._read(lambda: self._store.messages(value, source))
            if not states:
                raise NotFound(
                    f"no message with message_id {value!r}",
                    "MESSAGE_NOT_FOUND",
                    metadata={"message_id": value},
                )
            history: list[DeliveryReport] = []
            if request.include_history:
                history = await self._read(lambda: self._store.history(value, source))
            return FetchResponse(reports=states, history=history)

        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(request.page_token, selector, value, source) if request.page_token else 0
        page = await self._read(lambda: self._store.messages_by(selector, value, source, after, size))
        response = FetchResponse(reports=page.states, total_size=page.total)
        if page.next_after is not None:
            response.next_page_token = _encode_page_token(selector, value, source, page.next_after)
        if selector == "bulk_id":
            response.status_counts.extend(
                StatusCount(status=status, count=count)  # type: ignore[arg-type]  # stored enum values
                for status, count in sorted(page.status_counts.items())
            )
        return response

    # Stream.

    async def _stream(self, request: StreamRequest) -> AsyncIterator[StreamResponse]:
        if self._hub.subscriber_count >= self._max_streams:
            raise ResourceExhausted(
                f"too many open streams: at most {self._max_streams}; retry later",
                "TOO_MANY_STREAMS",
                metadata={"max_streams": str(self._max_streams)},
            )
        if request.heartbeat_seconds < 0:
            raise InvalidArgument(
                "heartbeat_seconds must not be negative",
                "INVALID_HEARTBEAT",
                violations=[FieldViolation("heartbeat_seconds", "must not be negative", "INVALID_VALUE")],
            )
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
        async for item in follow(self._store, self._hub, self._read, change_filter, after, heartbeat):
            if isinstance(item, Heartbeat):
                yield StreamResponse(cursor=str(item.cursor), heartbeat=True)
            else:
                yield StreamResponse(cursor=str(item.cursor), report=item.report, state=item.state)

    def _read(self, call: Callable[[], T]) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._reads, call)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: DlrhubError) -> None:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _parse_cursor(cursor: str) -> int:
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 19:
        raise InvalidArgument(
            f"malformed cursor {cursor!r}: pass a cursor from a StreamResponse or an IngestResult",
            "INVALID_CURSOR",
            violations=[FieldViolation("cursor", "not a cursor dlrhub gave out", "INVALID_VALUE")],
        )
    return int(cursor)


def _encode_page_token(selector: str, value: str, source: int, after: int) -> str:
    token = json.dumps([selector, value, source, after], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


def _decode_page_token(token: str, selector: str, value: str, source: int) -> int:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        token_selector, token_value, token_source, after = decoded
        valid = isinstance(after, int) and 0 <= after < 2**63  # a 64-bit position
    except (ValueError, TypeError, binascii.Error):
        valid = False
    if not valid:
        raise InvalidArgument(
            "page_token is not a token from a previous response",
            "INVALID_PAGE_TOKEN",
            violations=[
                FieldViolation("page_token", "not a next_page_token dlrhub gave out", "INVALID_VALUE")
            ],
        )
    if (token_selector, token_value, token_source) != (selector, value, source):
        raise InvalidArgument(
            "page_token belongs to a request with another selector or source",
            "PAGE_TOKEN_MISMATCH",
            violations=[
                FieldViolation(
                    "page_token", "the other request fields must match the first page's", "INVALID_VALUE"
                )
            ],
        )
    return int(after)
