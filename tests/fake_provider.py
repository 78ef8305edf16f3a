"""A fake SentSMSReport provider: a real HTTP server on 127.0.0.1 serving `GET /sms/1/reports`.

It follows the reference semantics (docs/normalisation.md §2): reports wait in a queue
and each is handed out ONCE; `Authorization: App <key>` is required (401 with an
UNAUTHORIZED body otherwise); `limit` defaults to 50 and must be 1 to
`max_limit` (400 with a BAD_REQUEST body and a text otherwise). Optional
`bulkId` and `messageId` filters narrow what is handed out.

Tests can make it misbehave for the next N requests (answer 500, answer 429,
hang longer than the client's timeout without handing anything out, drip its
answer a byte at a time, or answer a body of the test's own making; a script of
such steps, in order, with `serve_next` for normal answers in between), and it
records every request and every report it handed out, for assertions.

    provider = FakeProvider(api_key="k")
    await provider.start()
    provider.add(report("m-1"), report("m-2"))
    provider.fail_next(3)          # 500 for the next three requests
    ...
    await provider.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
_FAILURES = {
    400: ("BAD_REQUEST", "Bad request"),
    401: ("UNAUTHORIZED", "Invalid login details"),
    429: ("TOO_MANY_REQUESTS", "Too many requests"),
}


def report(
    message_id: str,
    *,
    bulk_id: str = "BULK-FAKE",
    group_id: int = 3,
    status_id: int = 5,
    done_at: str = "2019-11-09T16:00:00.000+0000",
) -> dict[str, Any]:
    """A valid SentSMSReport report (the shape of the reference's pull example)."""
    return {
        "bulkId": bulk_id,
        "messageId": message_id,
        "to": "41793026727",
        "sentAt": "2019-11-09T16:00:00.000+0000",
        "doneAt": done_at,
        "smsCount": 1,
        "price": {"pricePerMessage": 0.01, "currency": "EUR"},
        "status": {
            "groupId": group_id,
            "groupName": "DELIVERED",
            "id": status_id,
            "name": "DELIVERED_TO_HANDSET",
            "description": "Message delivered to handset",
        },
        "error": {
            "groupId": 0,
            "groupName": "Ok",
            "id": 0,
            "name": "NO_ERROR",
            "description": "No Error",
            "permanent": False,
        },
    }


def request_error(message_id: str, text: str) -> dict[str, Any]:
    """The provider's error body."""
    return {"requestError": {"serviceException": {"messageId": message_id, "text": text}}}


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One request the fake provider received, and how it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    # The HTTP status answered; 0 for a hang the client gave up on.
    status: int = 0
    # The message ids handed out in the answer.
    handed_out: tuple[str, ...] = ()


@dataclass(slots=True)
class Misbehaviour:
    """One step of a fake's script: what the next `remaining` requests get instead of a normal answer."""

    kind: str  # "ok", "status", "hang", "drip" or "body" (each fake plays those it knows)
    remaining: int
    status: int = 0
    seconds: float = 0.0
    # For "body": the answer's bytes and Content-Type.
    body: bytes = b""
    content_type: str = ""


class Script:
    """Misbehaviours for the next requests, played in the order they were added."""

    def __init__(self) -> None:
        self._steps: deque[Misbehaviour] = deque()

    def add(self, step: Misbehaviour) -> None:
        self._steps.append(step)

    def next(self) -> Misbehaviour | None:
        """The step for the request now, or None: a normal answer."""
        while self._steps:
            first = self._steps[0]
            if first.remaining > 0:
                first.remaining -= 1
                return first
            self._steps.popleft()
        return None


async def serve_local(app: web.Application) -> tuple[web.AppRunner, int]:
    """Runs `app` on 127.0.0.1, on a free port: its runner (to clean up) and the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


class FakeProvider:
    def __init__(self, api_key: str = "fake-api-key", *, max_limit: int = MAX_LIMIT) -> None:
        # The key it accepts; tests may change it at any time.
        self.api_key = api_key
        # The provider's largest accepted `limit`.
        self.max_limit = max_limit
        # Reports waiting to be handed out, oldest first.
        self.pending: deque[dict[str, Any]] = deque()
        # Every request received, in order.
        self.requests: list[ProviderRequest] = []
        # Every report handed out, in order.
        self.handed_out: list[dict[str, Any]] = []
        self.port = 0
        self._script = Script()
        self._runner: web.AppRunner | None = None
        self._released = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeProvider:
        app = web.Application()
        app.router.add_get("/sms/1/reports", self._reports)
        self._runner, self.port = await serve_local(app)
        self._released.clear()
        return self

    async def stop(self) -> None:
        self._released.set()  # hanging requests end now
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeProvider:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # What tests control.

    def add(self, *reports: dict[str, Any]) -> None:
        """Queues reports to hand out."""
        self.pending.extend(reports)

    # Misbehaviours form a script, played in the order they were added.

    def serve_next(self, times: int) -> None:
        """Answers the next `times` requests normally (to place failures later in the script)."""
        self._script.add(Misbehaviour("ok", times))

    def fail_next(self, times: int, status: int = 500) -> None:
        """Answers `status`, with the provider's error body, to the next `times` requests."""
        self._script.add(Misbehaviour("status", times, status=status))

    def throttle_next(self, times: int) -> None:
        """Answers 429 Too Many Requests to the next `times` requests."""
        self.fail_next(times, status=429)

    def hang_next(self, times: int, seconds: float = 5.0) -> None:
        """Holds the next `times` requests for `seconds` (or until stop) before answering 503."""
        self._script.add(Misbehaviour("hang", times, seconds=seconds))

    def drip_next(self, times: int, seconds_per_byte: float = 1.0) -> None:
        """Answers the next `times` requests normally, but writes the body a byte at a time, one every
        `seconds_per_byte` (until stop): each read is quick, the whole answer never ends in time."""
        self._script.add(Misbehaviour("drip", times, seconds=seconds_per_byte))

    def answer_next(self, body: bytes, content_type: str = "application/json", times: int = 1) -> None:
        """Answers 200 with `body` as it is (its reports are not counted as handed out)."""
        self._script.add(Misbehaviour("body", times, body=body, content_type=content_type))

    def handed_out_ids(self) -> list[str]:
        return [str(item["messageId"]) for item in self.handed_out]

    # The endpoint.

    async def _reports(self, request: web.Request) -> web.StreamResponse:
        index = len(self.requests)
        self.requests.append(
            ProviderRequest(request.method, request.path, dict(request.query), _headers(request.headers))
        )
        misbehaviour = self._script.next()
        response, handed = await self._answer(request, misbehaviour)
        self.requests[index] = _answered(self.requests[index], response.status, handed)
        if misbehaviour is not None and misbehaviour.kind == "drip" and response.status == 200:
            return await self._drip(request, response, misbehaviour.seconds)
        return response

    async def _drip(self, request: web.Request, answer: web.Response, seconds: float) -> web.StreamResponse:
        body = answer.body
        assert isinstance(body, bytes)
        dripping = web.StreamResponse(headers={"Content-Type": "application/json"})
        dripping.content_length = len(body)
        await dripping.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client gave up
            for index in range(len(body)):
                await dripping.write(body[index : index + 1])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), seconds)
            await dripping.write_eof()
        return dripping

    async def _answer(
        self, request: web.Request, misbehaviour: Misbehaviour | None
    ) -> tuple[web.Response, tuple[str, ...]]:
        if misbehaviour is not None and misbehaviour.kind == "body":
            return web.Response(
                body=misbehaviour.body, headers={"Content-Type": misbehaviour.content_type}
            ), ()
        if misbehaviour is not None and misbehaviour.kind == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), misbehaviour.seconds)
            return web.json_response(request_error("SERVICE_UNAVAILABLE", "hung"), status=503), ()
        if misbehaviour is not None and misbehaviour.kind == "status":
            status = misbehaviour.status
            message_id, text = _FAILURES.get(status, ("GENERAL_ERROR", "Internal server error"))
            return web.json_response(request_error(message_id, text), status=status), ()
        if request.headers.get("Authorization", "") != f"App {self.api_key}":
            body = request_error("UNAUTHORIZED", "Invalid login details")
            return web.json_response(body, status=401), ()
        limit_text = request.query.get("limit")
        try:
            limit = DEFAULT_LIMIT if limit_text is None else int(limit_text)
        except ValueError:
            limit = 0
        if not 1 <= limit <= self.max_limit:
            text = f"limit must be a whole number from 1 to {self.max_limit}, not {limit_text!r}"
            return web.json_response(request_error("BAD_REQUEST", text), status=400), ()
        results = self._take(limit, request.query.get("bulkId"), request.query.get("messageId"))
        self.handed_out.extend(results)
        handed = tuple(str(item["messageId"]) for item in results)
        return web.json_response({"results": results}), handed

    def _take(self, limit: int, bulk_id: str | None, message_id: str | None) -> list[dict[str, Any]]:
        taken: list[dict[str, Any]] = []
        kept: deque[dict[str, Any]] = deque()
        while self.pending:
            item = self.pending.popleft()
            matches = (bulk_id is None or item.get("bulkId") == bulk_id) and (
                message_id is None or item.get("messageId") == message_id
            )
            if matches and len(taken) < limit:
                taken.append(item)
            else:
                kept.append(item)
        self.pending = kept
        return taken


def _headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict(headers)


def _answered(recorded: ProviderRequest, status: int, handed: tuple[str, ...]) -> ProviderRequest:
    return ProviderRequest(recorded.method, recorded.path, recorded.query, recorded.headers, status, handed)
