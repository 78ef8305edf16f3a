"""The gRPC servicer: requests into calls on the domain objects, results into responses."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from deliveryreport.v1 import delivery_report_service_pb2 as service_pb2
from deliveryreport.v1 import delivery_report_service_pb2_grpc as service_grpc
from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    FetchRequest,
    FetchResponse,
    IngestOutcome,
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
    to_status,
)
from dlrhub.feed.follow import Heartbeat, follow_batches
from dlrhub.feed.hub import Hub
from dlrhub.normalise import typed_payload
from dlrhub.observability.calls import note
from dlrhub.store.base import Change, ChangeFilter, QuarantinedItem, Store, StoreError
from dlrhub.write.submission import is_wholly_rejected
from dlrhub.write.writer import TooManyItems, Writer

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_HEARTBEAT_SECONDS = 15
MAX_RENORMALISE_IDS = 10_000
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["DeliveryReportService"].full_name


def add_to_server(service: DeliveryReportService, server: grpc.aio.Server) -> None:
    """Registers the service as the generated code does, except that the serializers of Stream and
    StreamBatches also take bytes: a change is encoded once and the same bytes go to every
    subscriber (see StreamEncoder)."""
    captured = _CapturedHandlers()
    service_grpc.add_DeliveryReportServiceServicer_to_server(service, cast(grpc.aio.Server, captured))
    handlers = captured.handlers
    handlers["Stream"] = grpc.unary_stream_rpc_method_handler(
        service.Stream, request_deserializer=StreamRequest.FromString, response_serializer=_serialize
    )
    handlers["StreamBatches"] = grpc.unary_stream_rpc_method_handler(
        service.StreamBatches,
        request_deserializer=StreamBatchesRequest.FromString,
        response_serializer=_serialize,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]  # not in grpc-stubs


class _CapturedHandlers:
    """Stands in for the server while the generated code registers the method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, _: object) -> None:
        pass

    def add_registered_method_handlers(
        self, _: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = dict(handlers)


def _serialize(response: Message | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


# A StreamBatchesResponse is its StreamResponses, each framed as field 1 (length-delimited).
_RESPONSES_TAG = b"\x0a"
# A StreamBatchesResponse holds changes up to about this many bytes (clients accept 4 MiB by default).
MAX_BATCH_BYTES = 1 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _Encoded:
    """One change's StreamResponse, and the same framed as an item of a StreamBatchesResponse."""

    __slots__ = ("framed", "plain")

    def __init__(self, plain: bytes) -> None:
        self.plain = plain
        self.framed: bytes | None = None  # made when a StreamBatches subscriber first sends it


class StreamEncoder:
    """Each change's StreamResponse, encoded once however many subscribers send it.

    A StreamBatchesResponse is the concatenation of its changes framed as field 1, so batches cost no
    more encoding than single changes. Cursors are never reused, so a cursor names one encoding; the
    newest `size` are kept (as many as a subscriber buffers: live subscribers send a change within
    that window).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        # OrderedDict, not dict: popping the oldest of a dict scans the holes its deletions left.
        self._encoded: OrderedDict[int, _Encoded] = OrderedDict()

    def _entry(self, change: Change) -> _Encoded:
        entry = self._encoded.get(change.cursor)
        if entry is None:
            entry = self._encoded[change.cursor] = _Encoded(
                StreamResponse(
                    cursor=str(change.cursor), report=change.report, state=change.state
                ).SerializeToString()
            )
            if len(self._encoded) > self._size:
                self._encoded.popitem(last=False)
        return entry

    def response(self, change: Change) -> bytes:
        """The change as a StreamResponse."""
        return self._entry(change).plain

    def _framed(self, change: Change) -> bytes:
        entry = self._entry(change)
        if entry.framed is None:
            entry.framed = _RESPONSES_TAG + _varint(len(entry.plain)) + entry.plain
        return entry.framed

    def batches(self, changes: list[Change], max_bytes: int = MAX_BATCH_BYTES) -> Iterator[bytes]:
        """The changes as StreamBatchesResponses of up to `max_bytes` each (or one bigger change)."""
        parts: list[bytes] = []
        size = 0
        for change in changes:
            framed = self._framed(change)
            if parts and size + len(framed) > max_bytes:
                yield b"".join(parts)
                parts, size = [], 0
            parts.append(framed)
            size += len(framed)
        if parts:
            yield b"".join(parts)


class DeliveryReportService(service_grpc.DeliveryReportServiceServicer):
    """Ingest, Fetch, Stream, and the quarantine."""

    def __init__(
        self, *, writer: Writer, store: Store, hub: Hub, reads: Executor, max_streams: int = 1000
    ) -> None:
        self._writer = writer
        self._store = store
        self._hub = hub
        self._reads = reads
        self._max_streams = max_streams
        self._encode = StreamEncoder(size=hub.capacity)

    async def Ingest(self, request: IngestRequest, context: Context) -> IngestResponse:
        return await _answer(context, self._ingest(request))

    async def Fetch(self, request: FetchRequest, context: Context) -> FetchResponse:
        return await _answer(context, self._fetch(request))

    async def ListQuarantine(
        self, request: ListQuarantineRequest, context: Context
    ) -> ListQuarantineResponse:
        return await _answer(context, self._list_quarantine(request))

    async def RenormaliseQuarantine(
        self, request: RenormaliseQuarantineRequest, context: Context
    ) -> RenormaliseQuarantineResponse:
        return await _answer(context, self._renormalise_quarantine(request))

    async def Stream(  # type: ignore[override]  # bytes as well: see add_to_server
        self, request: StreamRequest, context: Context
    ) -> AsyncIterator[StreamResponse | bytes]:
        """Yields heartbeats as messages and changes already encoded (see add_to_server)."""
        try:
            async for item in await self._follow(request):
                if isinstance(item, Heartbeat):
                    yield StreamResponse(cursor=str(item.cursor), heartbeat=True)
                else:
                    for change in item:
                        yield self._encode.response(change)
        except DlrhubError as error:
            await _abort(context, error)

    async def StreamBatches(  # type: ignore[override]  # bytes as well: see add_to_server
        self, request: StreamBatchesRequest, context: Context
    ) -> AsyncIterator[StreamBatchesResponse | bytes]:
        """Stream's feed with the changes ready together in one message, encoded (see add_to_server)."""
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
        if request.request_id:
            note(request_id=request.request_id)
        try:
            ingested = await self._writer.ingest(payload, format, request.request_id)
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
        size = _page_size(request.page_size)
        source = request.source
        if selector == "message_id":
            # A keyed lookup takes microseconds, less than handing it to a reader thread and back.
            states = self._store.messages(value, source)
            if not states:
                raise NotFound(
                    f"no message with message_id {value!r}",
                    "MESSAGE_NOT_FOUND",
                    metadata={"message_id": value},
                )
            history: list[DeliveryReport] = []
            if request.include_history:
                history = self._store.history(value, source)
            return FetchResponse(reports=states, history=history)

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

    # Quarantine.

    async def _list_quarantine(self, request: ListQuarantineRequest) -> ListQuarantineResponse:
        size = _page_size(request.page_size)
        scope = "all" if request.include_resolved else "open"
        after = _decode_page_token(request.page_token, "quarantine", scope, 0) if request.page_token else 0
        rows = await self._read(
            lambda: self._store.quarantined(after, size + 1, include_resolved=request.include_resolved)
        )
        open_count = await self._read(self._store.open_quarantine_count)
        response = ListQuarantineResponse(
            items=[_quarantined_item(quarantine_id, item) for quarantine_id, item in rows[:size]],
            open_count=open_count,
        )
        if len(rows) > size:
            response.next_page_token = _encode_page_token("quarantine", scope, 0, rows[size - 1][0])
        return response

    async def _renormalise_quarantine(
        self, request: RenormaliseQuarantineRequest
    ) -> RenormaliseQuarantineResponse:
        if len(request.ids) > MAX_RENORMALISE_IDS:
            raise InvalidArgument(
                f"at most {MAX_RENORMALISE_IDS} ids per call; give none to re-run every open item",
                "TOO_MANY_IDS",
                violations=[FieldViolation("ids", f"at most {MAX_RENORMALISE_IDS} ids", "INVALID_VALUE")],
                metadata={"max_ids": str(MAX_RENORMALISE_IDS)},
            )
        if request.ids:
            wanted = sorted(set(request.ids))
            found = await self._read(
                functools.partial(self._store.quarantined, 0, len(wanted), include_resolved=True, ids=wanted)
            )
            unknown = sorted(set(wanted) - {quarantine_id for quarantine_id, _ in found})
            if unknown:
                listed = ", ".join(map(str, unknown[:20])) + (", ..." if len(unknown) > 20 else "")
                raise NotFound(
                    f"no quarantined item with id {listed}; nothing was re-run",
                    "QUARANTINED_ITEM_NOT_FOUND",
                    metadata={"ids": ",".join(map(str, unknown[:100])), "count": str(len(unknown))},
                )
        response = RenormaliseQuarantineResponse()
        after = 0
        while True:
            rows = await self._read(
                functools.partial(
                    self._store.quarantined, after, 500, include_resolved=False, ids=request.ids
                )
            )
            for quarantine_id, item in rows:
                try:
                    ingested = await self._writer.renormalise(quarantine_id, item)
                except StoreError as error:
                    raise Unavailable(
                        "the store could not commit; nothing more was re-run", "STORE_UNAVAILABLE"
                    ) from error
                result = response.results.add(id=quarantine_id)
                if ingested.rejection is not None:
                    rejection = ingested.rejection
                    result.results.add(
                        outcome=IngestOutcome.INGEST_OUTCOME_REJECTED,
                        error=ItemError(
                            field=rejection.field, reason=rejection.reason, description=rejection.description
                        ),
                    )
                else:
                    result.results.extend(ingested.response.results)
                result.resolved = ingested.rejection is None and ingested.response.rejected_count == 0
                if result.resolved:
                    response.resolved_count += 1
                else:
                    response.still_rejected_count += 1
            if len(rows) < 500:
                return response
            after = rows[-1][0]

    # Stream.

    async def _follow(self, request: StreamRequest) -> AsyncIterator[list[Change] | Heartbeat]:
        """The feed the request asks for, once the request is checked (raises DlrhubError)."""
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
        # Checked after the last await before follow() subscribes: no stream starts once the hub has
        # closed (it would stay open until the server's grace period ran out), and concurrent calls
        # cannot all pass the limit.
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

    def _read(self, call: Callable[[], T]) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._reads, call)


async def _answer(context: Context, work: Awaitable[T]) -> T:
    """The result of a unary call, or the call aborted with the status of its domain error."""
    try:
        return await work
    except DlrhubError as error:
        await _abort(context, error)
        raise  # unreachable: abort raises


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(
            "page_size must not be negative",
            "INVALID_PAGE_SIZE",
            violations=[FieldViolation("page_size", "must not be negative", "INVALID_VALUE")],
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


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


async def _abort(context: Context, error: DlrhubError) -> None:
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
    except (ValueError, TypeError, binascii.Error, RecursionError):
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
