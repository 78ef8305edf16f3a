"""Per-call observability: one JSON log line per call, and RPC metrics.

The call interceptor times every gRPC call, counts it by method and status
code, and logs one line for it (see CallLog: in runs, with the time the call
ended): the RPC, its code, its duration and whatever the servicer added with
`note()` (request id, outcome counts). The webhooks log their request lines
through a CallLog too. Payload contents never go into these lines (they hold
phone numbers). With tracing on (tracing.py), a call's line carries its trace id.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.errors import DlrhubError, internal_error, invalid_argument, store_unavailable, to_status
from dlrhub.observability.metrics import Metrics
from dlrhub.observability.tracing import current_trace_id
from dlrhub.store.base import StoreError

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)
# Characters of a caller's x-request-id kept in a log line (the rest is cut off).
MAX_LOGGED_REQUEST_ID = 128

_call: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar("dlrhub_call", default=None)


def note(**fields: object) -> None:
    """Adds fields to the log line of the call being served (no-op outside a call)."""
    current = _call.get()
    if current is not None:
        current.update(fields)


class CallLog:
    """The per-call log lines (of gRPC calls, or of webhook requests), logged in runs rather than one
    at a time.

    Logged as each call ended, its line cost a Fetch ~50 µs of server CPU; logged in runs of lines,
    the same lines cost ~20 µs each (measured under load: the same work, done in a run, stays warm in
    the CPU's caches instead of alternating with grpc's). So a call's line is queued with the time the
    call ended (and its trace id), and the queue is logged on the event loop when `capacity` lines
    wait or `interval` seconds after the first, or by `flush()`. After `close()` (at shutdown) a line
    is logged at once: a stream whose client vanished can end after the server has stopped.

    So a call's line reaches the log a little late (plus the handler's own batching of writes), and
    can follow lines logged after its call ended; each line has its own time to sort by.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        message: str = "rpc",
        *,
        capacity: int = 256,
        interval: float = 0.2,
        traced: bool = False,
    ) -> None:
        # The lines' logger and message: this module's "rpc" lines, or the webhooks' "http" lines.
        self.logger = logger or log
        self.message = message
        self.capacity = capacity
        self.interval = interval
        # Tracing is on: each line takes the trace id of its call.
        self.traced = traced
        self._pending: list[tuple[float, dict[str, object]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def add(self, fields: dict[str, object]) -> None:
        """Queues a call's line (on the event loop, as the call ends)."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if self.traced:
            trace_id = current_trace_id()
            if trace_id is not None:
                fields["trace_id"] = trace_id
        self._pending.append((time.time(), fields))
        if self._closed:
            self.flush()
        elif len(self._pending) == self.capacity:
            # Soon, not now: not inside this call, whose trace and context are not the others'.
            asyncio.get_running_loop().call_soon(self.flush, context=contextvars.Context())
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self.interval, self.flush, context=contextvars.Context()
            )

    def flush(self) -> None:
        """Logs every queued line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        for created, fields in pending:
            try:
                record = self.logger.makeRecord(
                    self.logger.name, logging.INFO, "", 0, self.message, (), None, extra=fields
                )
                record.created = created
                record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord does
                self.logger.handle(record)
            except Exception:  # one bad line (a note() field named like a LogRecord attribute) only
                self.logger.exception("could not log a call's line")

    def close(self) -> None:
        """Logs what is queued, and from now on every line at once (at shutdown)."""
        self._closed = True
        self.flush()


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler, of any shape, in one place that logs, counts and maps errors.

    Each call's outcome becomes a status here, once: a domain error its own (errors.to_status); a
    store that cannot read or commit UNAVAILABLE with reason STORE_UNAVAILABLE; anything else
    INTERNAL with a fixed message, and an ERROR line with the traceback and the call's request id.
    No exception text reaches a caller.

    A streaming handler (an async generator, or a coroutine that writes with `context.write`, as
    grpc_health's Watch does) is served by an async generator that writes every response itself
    and yields none: so a write that fails because the client has gone ends the call as CANCELLED
    here, instead of failing inside grpc (which logs it as an ERROR), and an outer interceptor that
    expects an async generator (OpenTelemetry's) still finds one.
    """

    def __init__(self, metrics: Metrics, call_log: CallLog) -> None:
        self._metrics = metrics
        self._log = call_log

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(handler_call_details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            return handler  # type: ignore[return-value]
        method = handler_call_details.method.lstrip("/")
        options = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        behaviour: Any
        if (behaviour := handler.unary_unary) is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, behaviour, False), **options)
        if (behaviour := handler.unary_stream) is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(method, behaviour, False), **options)
        if (behaviour := handler.stream_unary) is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(method, behaviour, True), **options)
        behaviour = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(self._stream(method, behaviour, True), **options)

    def _unary(
        self, method: str, behaviour: Callable[..., Awaitable[Any]], streaming_requests: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            fields = _fields(method, context)
            token = _call.set(fields)
            started = time.perf_counter()
            try:
                if streaming_requests:
                    request = _checked(request)
                elif isinstance(request, _Undecodable):
                    raise request.refusal()
                return await behaviour(request, context)
            except BaseException as error:
                status = _status_of(error, context, fields)
            finally:
                self._finish(method, started, fields)
                _call.reset(token)
            return await _abort(context, status)

        return call

    def _stream(
        self, method: str, behaviour: Callable[..., Any], streaming_requests: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        generator = inspect.isasyncgenfunction(behaviour)

        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            fields = _fields(method, context)
            token = _call.set(fields)
            started = time.perf_counter()
            status = None
            try:
                if streaming_requests:
                    request = _checked(request)
                elif isinstance(request, _Undecodable):
                    raise request.refusal()
                if generator:
                    fields["messages"] = sent = 0
                    responses = behaviour(request, context)
                    try:
                        async for response in responses:
                            await context.write(response)
                            sent += 1
                            fields["messages"] = sent
                    finally:
                        await responses.aclose()
                else:  # a coroutine that writes its responses itself
                    await behaviour(request, context)
            except BaseException as error:
                status = _status_of(error, context, fields)
            finally:
                self._finish(method, started, fields)
                _call.reset(token)
            if status is not None:
                await _abort(context, status)
            return
            yield  # type: ignore[unreachable]  # an async generator that yields nothing (see the class)

        return call

    def _finish(self, method: str, started: float, fields: dict[str, object]) -> None:
        seconds = time.perf_counter() - started
        code = str(fields.setdefault("code", "OK"))
        self._metrics.record_rpc(method, code, seconds)
        fields["duration_ms"] = round(seconds * 1000, 3)
        self._log.add(fields)


def _status_of(error: BaseException, context: Context, fields: dict[str, object]) -> grpc.Status:
    """The status to end a call that raised `error` with, its code put in `fields`; raises again what
    ended the call already (an abort, a cancellation) or is not the call's to answer."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        fields["code"] = "CANCELLED"
        raise error
    if isinstance(error, grpc.aio.AbortError):  # aborted already (by the auth interceptor)
        fields["code"] = _code(context)
        raise error
    if isinstance(error, grpc.aio.InternalError):  # a write failed: the call is over (the client left)
        fields["code"] = "CANCELLED"
        raise asyncio.CancelledError from error
    if isinstance(error, DlrhubError):
        status = to_status(error)
    elif isinstance(error, StoreError):
        fields["error"] = str(error)
        status = to_status(store_unavailable())
    elif isinstance(error, Exception):
        request_id = str(fields.setdefault("request_id", uuid.uuid4().hex[:16]))
        log.error(
            "internal error in %s",
            fields["rpc"],
            exc_info=error,
            extra={"rpc": fields["rpc"], "request_id": request_id},
        )
        status = to_status(internal_error(request_id))
    else:  # KeyboardInterrupt, SystemExit
        raise error
    fields["code"] = status.code.name
    return status


async def _abort(context: Context, status: grpc.Status) -> NoReturn:
    """Ends the call with `status` (after its line is logged: the line has the time the call ended)."""
    try:
        await context.abort(status.code, status.details, status.trailing_metadata)
    except grpc.aio.InternalError:  # the client left before the status could be sent
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


class _Undecodable:
    """A request whose bytes are not a valid message (bad protobuf, or strings not UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def refusal(self) -> DlrhubError:
        """The error to answer: INVALID_ARGUMENT UNDECODABLE_REQUEST, or the domain error the
        deserialiser raised (transport/handlers.py refuses too many typed reports)."""
        if isinstance(self.error, DlrhubError):
            return self.error
        return invalid_argument(
            "",
            "not a valid protobuf message (or a string is not UTF-8)",
            ErrorReason.UNDECODABLE_REQUEST,
            message=f"the request is not a valid protobuf message: {self.error}",
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Lets an undecodable request reach the call, to be refused as INVALID_ARGUMENT (or with the
    domain error the deserialiser raised: transport/handlers.py refuses too many typed reports).

    grpc.aio would otherwise answer UNKNOWN by itself when deserialising fails.
    """
    if deserializer is None:
        return None
    decode = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as error:  # DecodeError, or a string that is not UTF-8
            return _Undecodable(error)

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A stream of requests, refusing one that could not be decoded."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.refusal()
        yield request


def _fields(method: str, context: Context) -> dict[str, object]:
    fields: dict[str, object] = {"rpc": method}
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            fields["request_id"] = value[:MAX_LOGGED_REQUEST_ID]
    return fields


def _code(context: Context) -> str:
    """The status an aborted call ended with."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
