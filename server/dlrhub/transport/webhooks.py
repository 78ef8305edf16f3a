"""HTTP endpoints for provider pushes, served by aiohttp on the gRPC server's event loop.

    POST /webhooks/gms                         one GMS report object, or a JSON array of them
    POST /webhooks/sent-sms-report             a SentSMSReport body {"results": [...]}
    POST /webhooks/sent-sms-report/{channel}   the same, from an endpoint of one channel (whatsapp,
                                               viber, ...: transport/channels.py): the channel of
                                               a report whose body names none

All take the same path as Ingest (normalise -> store -> stream) and answer:
200 once every item is committed; 400 with a JSON body naming what was wrong
per item (the valid items are stored all the same); 401 without the
configured credentials, 403 from an address outside the allow list
(webhook_access.py; a channel route requires what its parent route does); 404
for a channel with no such name; 408 when the body does not arrive in time; 413 over the
body size limit; 503 when the store cannot commit, so the provider retries.
Nothing else is served on this port (metrics are on the admin port: admin.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from deliveryreport.v1.delivery_report_pb2 import Channel
from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestOutcome, IngestResponse
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.observability.calls import CallLog
from dlrhub.observability.metrics import Metrics
from dlrhub.store.base import StoreError
from dlrhub.transport.channels import channel_named
from dlrhub.transport.webhook_access import Access
from dlrhub.write.writer import TooManyItems, Writer

log = logging.getLogger(__name__)

_DETAILS = web.RequestKey("details", dict)
ROUTES: dict[str, Format.ValueType] = {
    "/webhooks/gms": Format.FORMAT_GMS,
    "/webhooks/sent-sms-report": Format.FORMAT_SENT_SMS_REPORT,
}
# Routes with a channel of their own under them.
CHANNEL_ROUTES = ("/webhooks/sent-sms-report",)
_OUTCOMES = {
    IngestOutcome.INGEST_OUTCOME_ACCEPTED: "ACCEPTED",
    IngestOutcome.INGEST_OUTCOME_DUPLICATE: "DUPLICATE",
    IngestOutcome.INGEST_OUTCOME_REJECTED: "REJECTED",
}


def create_app(
    writer: Writer,
    access: dict[str, Access],
    max_body_bytes: int,
    body_timeout: float = 60.0,
    metrics: Metrics | None = None,
    call_log: CallLog | None = None,
) -> web.Application:
    """The webhook application; `access` maps a route path to what it requires (open if absent).

    A body must arrive within `body_timeout` seconds of the request head. Every request is logged in
    one line (by `call_log`, in runs) and counted by route and status.
    """
    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[_observe(metrics, call_log or CallLog(log, "http"))]
    )
    for path, format in ROUTES.items():
        handler = _handler(writer, format, access.get(path, Access()), body_timeout)
        app.router.add_post(path, handler)
        if path in CHANNEL_ROUTES:
            app.router.add_post(path + "/{channel}", handler)
    return app


def _observe(metrics: Metrics | None, call_log: CallLog) -> Any:
    """Middleware: one log line per request (route, status, duration, request id, outcome counts)."""

    @web.middleware
    async def observe(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Any:
        started = time.perf_counter()
        details: dict[str, object] = {}
        request[_DETAILS] = details
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            if metrics is not None:
                metrics.http_requests.labels(route, str(status)).inc()
            call_log.add(
                {
                    "route": route,
                    "status": status,
                    "request_id": request.headers.get("X-Request-Id", ""),
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    **details,
                }
            )

    return observe


def _handler(writer: Writer, format: Format.ValueType, access: Access, body_timeout: float) -> Any:
    async def handle(request: web.Request) -> web.Response:
        refusal = access.refusal(request)
        if refusal is not None:
            status, rejection, headers = refusal
            request[_DETAILS]["reason"] = ErrorReason.Name(rejection.reason)
            return _error(status, rejection.reason, rejection.description, headers)
        channel = Channel.CHANNEL_UNSPECIFIED
        if "channel" in request.match_info:
            try:
                channel = channel_named(request.match_info["channel"].lower())
            except ValueError as error:
                return _error(404, ErrorReason.INVALID_VALUE, str(error), field="channel")
        try:
            async with asyncio.timeout(body_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge as error:
            return _error(413, ErrorReason.BODY_TOO_LARGE, f"the body is over the limit: {error.text}")
        except TimeoutError:
            description = f"the body did not arrive within {body_timeout:g} s"
            timed_out = _error(408, ErrorReason.BODY_TIMEOUT, description, {"Connection": "close"})
            timed_out.force_close()
            return timed_out
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            return _error(400, ErrorReason.INVALID_UTF8, f"the body is not UTF-8 (byte {error.start})")
        try:
            ingested = await writer.ingest(text, format, default_channel=channel)
        except TooManyItems as error:
            return _error(413, ErrorReason.TOO_MANY_ITEMS, str(error))
        except StoreError:
            # Rate-limited when it repeats (observability.logs.RepeatFilter): the first with its traceback.
            log.exception("webhook could not commit", extra={"route": request.path})
            return _error(503, ErrorReason.STORE_UNAVAILABLE, "could not store the reports; retry")
        if ingested.rejection is not None:
            rejection = ingested.rejection
            request[_DETAILS]["reason"] = ErrorReason.Name(rejection.reason)
            return _error(400, rejection.reason, rejection.description, field=rejection.field)
        response = ingested.response
        request[_DETAILS].update(
            accepted=response.accepted_count,
            duplicate=response.duplicate_count,
            rejected=response.rejected_count,
        )
        return web.json_response(_summary(response), status=400 if response.rejected_count else 200)

    return handle


def _summary(response: IngestResponse) -> dict[str, Any]:
    results = []
    for result in response.results:
        entry: dict[str, Any] = {"index": result.index, "outcome": _OUTCOMES[result.outcome]}
        if result.cursor:
            entry["cursor"] = result.cursor
        if result.HasField("error"):
            error = result.error
            entry["error"] = {"field": error.field, "reason": error.reason, "description": error.description}
        results.append(entry)
    return {
        "accepted": response.accepted_count,
        "duplicate": response.duplicate_count,
        "rejected": response.rejected_count,
        "results": results,
    }


def _error(
    status: int,
    reason: ErrorReason.ValueType,
    description: str,
    headers: dict[str, str] | None = None,
    *,
    field: str = "",
) -> web.Response:
    body = {"error": {"field": field, "reason": ErrorReason.Name(reason), "description": description}}
    return web.json_response(body, status=status, headers=headers)
