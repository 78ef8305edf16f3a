"""A fake GMS delivery-report endpoint: a real HTTP server on 127.0.0.1 serving GMS's GET report.

    GET /{client_id}/api/dr/{message_id}/simple | /advanced, HTTP Basic authentication

The paths, the authentication and the answers' shapes are GMS's own (API JSON v2, Section 5, "GET
single message delivery report": bestblast/GMS_Hyber_API `docs/source/chapter5.rst`, the source of
https://gms-hyber-api.readthedocs.io/en/latest/chapter5.html; the fixtures in
tests/fixtures/providers/gms/ are its examples). GMS documents no error bodies: a refused or unknown
request answers `{"error": {"message": ...}}`, the shape the PHP client idapgroup/Viber-SDK
(`src/Api.php`) reads.

GMS publishes no code that means "seen" (its code table, Section 9, is not public), so a message is
made seen here with SEEN_HYBER_STATUS, a code the tests map to SEEN in an operator code table
(`seen_code_table`), as an operator does with the code GMS gives them.

Tests can make it misbehave for the next N requests (answer a status, or hang), slow every answer
down (`delay`, to overlap requests), and it records every request and the most requests it had in
flight at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fake_provider import Misbehaviour, Script, serve_local

CLIENT_ID = "1234"
LOGIN = "dlrhub"
PASSWORD = "gms-secret"
# Not GMS's: the code these tests' operator code table maps to SEEN.
SEEN_HYBER_STATUS = 23999
DELIVERED = {"status": 2, "substatus": 23}
DELIVERED_HYBER_STATUS = {"viber": 23033, "whatsapp": 23011, "sms": 23011}


def seen_code_table(directory: Path) -> Path:
    """An operator code table (DLRHUB_GMS_CODES) that maps SEEN_HYBER_STATUS to SEEN."""
    path = directory / "gms_codes.json"
    rule = {"when": {"hyber_status": SEEN_HYBER_STATUS}, "status": "SEEN", "note": "the test GMS's seen"}
    path.write_text(json.dumps({"rules": [rule]}))
    return path


@dataclass(frozen=True, slots=True)
class GmsRequest:
    """One request the fake received, and its answer's HTTP status (0: the client gave up)."""

    message_id: str
    report: str
    authorization: str
    status: int = 0


class FakeGms:
    def __init__(self, login: str = LOGIN, password: str = PASSWORD) -> None:
        # The credentials it accepts; tests may change them at any time.
        self.login = login
        self.password = password
        # Per message id, its channel attempt as GMS reports it now (see deliver and see).
        self.attempts: dict[str, dict[str, Any]] = {}
        self.requests: list[GmsRequest] = []
        # Seconds each answer waits before it is sent.
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0
        self._script = Script()  # of "status" and "hang" steps
        self._runner: web.AppRunner | None = None
        self._released = asyncio.Event()

    @property
    def base_url(self) -> str:
        """DLRHUB_GMS_SEEN_BASE_URL: everything before /api/dr/."""
        return f"http://127.0.0.1:{self.port}/{CLIENT_ID}"

    async def __aenter__(self) -> FakeGms:
        app = web.Application()
        app.router.add_get("/{client_id}/api/dr/{message_id}/{report}", self._report)
        self._runner, self.port = await serve_local(app)
        return self

    async def __aexit__(self, *_: object) -> None:
        self._released.set()  # hanging requests end now
        if self._runner is not None:
            await self._runner.cleanup()

    # What tests control.

    def deliver(self, message_id: str, channel: str, time_ms: int) -> dict[str, Any]:
        """GMS delivered the message over `channel` at `time_ms`; returns the push GMS sends."""
        self.attempts[message_id] = {
            "phone_number": "380961111111",
            "message_id": message_id,
            "extra_id": f"ref-{message_id}",
            "time": time_ms,
            "last_partner": channel,
            **DELIVERED,
            "hyber_status": DELIVERED_HYBER_STATUS[channel],
        }
        push = dict(self.attempts[message_id])
        push["number"] = push.pop("phone_number")
        push["sent_via"] = push.pop("last_partner")
        return push

    def see(self, message_id: str, time_ms: int) -> None:
        """The recipient saw the message at `time_ms`."""
        self.attempts[message_id] |= {"time": time_ms, "hyber_status": SEEN_HYBER_STATUS}

    def fail_next(self, times: int, status: int) -> None:
        self._script.add(Misbehaviour("status", times, status=status))

    def hang_next(self, times: int, seconds: float = 5.0) -> None:
        """Holds the next `times` requests for `seconds` (or until the fake stops), then answers 503."""
        self._script.add(Misbehaviour("hang", times, seconds=seconds))

    def asked(self, message_id: str | None = None) -> list[GmsRequest]:
        """The requests answered 200 (about `message_id`, if given)."""
        return [
            request
            for request in self.requests
            if request.status == 200 and message_id in (None, request.message_id)
        ]

    # The endpoint.

    async def _report(self, request: web.Request) -> web.Response:
        message_id, report = request.match_info["message_id"], request.match_info["report"]
        index = len(self.requests)
        self.requests.append(GmsRequest(message_id, report, request.headers.get("Authorization", "")))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            response = await self._answer(request, message_id, report)
        finally:
            self.in_flight -= 1
        recorded = self.requests[index]
        self.requests[index] = GmsRequest(
            recorded.message_id, recorded.report, recorded.authorization, response.status
        )
        return response

    async def _answer(self, request: web.Request, message_id: str, report: str) -> web.Response:
        misbehaviour = self._script.next()
        if misbehaviour is not None and misbehaviour.kind == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), misbehaviour.seconds)
            return _error(503, "hung")
        if misbehaviour is not None:
            return _error(misbehaviour.status, "scripted failure")
        expected = base64.b64encode(f"{self.login}:{self.password}".encode()).decode()
        if request.match_info["client_id"] != CLIENT_ID or request.headers.get("Authorization") != (
            f"Basic {expected}"
        ):
            return _error(401, "unauthorized")
        attempt = self.attempts.get(message_id)
        if attempt is None or report not in ("simple", "advanced"):
            return _error(404, "not found")
        if report == "simple":
            return web.json_response(attempt)
        channel = attempt["last_partner"]
        return web.json_response(
            {
                "reports": [attempt],
                "started": True,
                "processing": False,
                "delivered_via": channel,
                "channels": [{"channel": channel, "ttl": 60}],
            }
        )


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)
