"""Asks GMS whether messages delivered over Viber or WhatsApp have been seen (opt-in).

GMS pushes the final status of a message, except "seen": that is pushed only when GMS enables it on
request, or asked for with the GET report method. The method, from GMS's API documentation (JSON v2,
Section 5, "Get single message delivery report": https://gms-hyber-api.readthedocs.io/en/latest/chapter5.html,
whose source is `docs/source/chapter5.rst` of github.com/bestblast/GMS_Hyber_API; the same on
https://developers.gms-worldwide.com/cpaas/get-single-message-delivery-report/get-detailed-delivery-report/):

    GET https://dr-v2-{site}.hyber.im/{client_id}/api/dr/{message_id}/advanced   (or .../simple)
    HTTP Basic authentication; login and password "TBA by GMS in technical plan"
    200 OK with the report (simple) or every channel attempt in `reports[]` (advanced)

`base_url` is everything before `/api/dr/`: the host GMS gives (`dr-v2-{site}.hyber.im`; the
developer portal shows `dr-v2.hyber.im`) and the client id. The answer goes through the one write
path (Writer, the GMS format), so it merges as any report does.

Where the documentation is silent, chosen here: GMS publishes no code that means "seen" (Section 9,
the code table, is not public), so the code table decides (an operator adds GMS's seen code to
DLRHUB_GMS_CODES, mapped to SEEN); a message is done once its stored state is no longer DELIVERED.
Nor does it document errors or rate limits: 401/403 mean the credentials are refused (health
NOT_SERVING, backoff); 429, 5xx, timeouts, connection errors and bodies over the cap back off
exponentially with jitter, for every message; any other status (404: GMS does not know the id) is
logged and that message is asked again on its schedule.

Which messages: GMS messages whose state is DELIVERED on Viber or WhatsApp, delivered within
`window` seconds (Store.awaiting_seen, so the schedule is found again after a restart). Each is asked
about `interval` seconds after delivery, then after intervals that double up to `interval_max`,
until its state is no longer DELIVERED or the window passes (then it is dropped and counted). At
most `concurrency` requests are in flight; each has one deadline (`timeout`) and a body cap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import heapq
import logging
import random
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from deliveryreport.v1.delivery_report_pb2 import DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.observability.metrics import Metrics
from dlrhub.store.base import SEEN_CHANNELS, ReadRunner, Store, StoreError
from dlrhub.transport.fetching import FetchFailure, backoff_delay, fetch, stop_task
from dlrhub.write.writer import Writer

log = logging.getLogger(__name__)

HEALTH_SERVICE = "dlrhub.GmsSeenFetcher"
REPORTS = ("advanced", "simple")
_DELIVERED = DeliveryStatus.DELIVERY_STATUS_DELIVERED
_SEEN = DeliveryStatus.DELIVERY_STATUS_SEEN
_GMS = Source.SOURCE_GMS
# Outcomes that pause every request (the provider or the way to it is in trouble), with backoff.
_PAUSING = frozenset(
    {"auth", "throttled", "server_error", "timeout", "connection", "body_too_large", "store"}
)


class BadSetting(ValueError):
    """A GmsSeenSettings field (`setting`) has a value it cannot take."""

    def __init__(self, setting: str, expected: str) -> None:
        super().__init__(f"{setting} must be {expected}")
        self.setting = setting
        self.expected = expected


@dataclass(frozen=True, slots=True)
class GmsSeenSettings:
    # Everything before /api/dr/: https://dr-v2-{site}.hyber.im/{client_id}
    base_url: str
    # HTTP Basic credentials, as GMS gives them.
    login: str
    password: str
    # Which answer to ask for: "advanced" (every channel attempt) or "simple".
    report: str = "advanced"
    # Seconds after delivery that a message is asked about; then it is dropped.
    window: float = 86_400.0
    # Requests in flight at most.
    concurrency: int = 4
    # Seconds from delivery to the first request, doubling after each, up to interval_max.
    interval: float = 300.0
    interval_max: float = 3600.0
    # Seconds a request may take in all, and the largest answer read.
    timeout: float = 30.0
    max_body_bytes: int = 1024 * 1024
    # Backoff after failures that concern every request: initial and maximum seconds.
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    # Seconds between looks at the store for messages to ask about.
    rescan: float = 60.0
    # Messages read from the store per page.
    page: int = 1000
    # Real seconds between looks at the clock while nothing is due.
    tick: float = 1.0

    def __post_init__(self) -> None:
        if self.report not in REPORTS:
            raise BadSetting("report", f"one of {', '.join(REPORTS)}, not {self.report!r}")
        if self.concurrency < 1:
            raise BadSetting("concurrency", f"at least 1, not {self.concurrency}")
        for name in ("window", "interval", "interval_max", "timeout", "rescan", "tick"):
            if not getattr(self, name) > 0:
                raise BadSetting(name, f"a number of seconds above 0, not {getattr(self, name)}")

    def url(self, message_id: str) -> str:
        return f"{self.base_url.rstrip('/')}/api/dr/{urllib.parse.quote(message_id, safe='')}/{self.report}"

    def wait_after(self, asks: int) -> float:
        """Seconds to the next request about a message asked `asks` times (0: from its delivery)."""
        doubling: float = 2.0 ** min(asks, 30)
        return min(self.interval_max, self.interval * doubling)


@dataclass(order=True, slots=True)
class _Entry:
    """A message on the schedule; ordered by when it is due."""

    due: float
    message_id: str = field(compare=False)
    delivered: int = field(compare=False)
    asks: int = field(default=0, compare=False)


class GmsSeenFetcher:
    """Keeps the schedule of messages awaiting "seen" and asks GMS about each when it is due."""

    def __init__(
        self,
        settings: GmsSeenSettings,
        writer: Writer,
        store: Store,
        read: ReadRunner,
        clock: Callable[[], int],
        *,
        client: httpx.AsyncClient | None = None,
        set_serving: Callable[[bool], Awaitable[None]] | None = None,
        jitter: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self._writer = writer
        self._store = store
        self._read = read
        self._clock = clock
        self._client = client or httpx.AsyncClient()
        self._set_serving = set_serving
        self._jitter = jitter
        self._metrics = metrics
        token = base64.b64encode(f"{settings.login}:{settings.password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Accept": "application/json"}
        # The schedule: every message awaiting "seen", and a heap of them by due time.
        self._entries: dict[str, _Entry] = {}
        self._due: list[_Entry] = []
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._next_scan = 0.0
        self._paused_until = 0.0
        # Failures in a row of the kinds that pause every request.
        self.failures = 0
        # Scans of the store done.
        self.scans = 0
        self._serving_now: bool | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def awaiting(self) -> int:
        """Messages on the schedule."""
        return len(self._entries)

    @property
    def paused_until(self) -> float:
        """When (clock seconds) requests may go out again after a failure that concerns them all."""
        return self._paused_until

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="dlrhub-gms-seen")

    async def stop(self) -> None:
        """Stops asking, cancelling requests in flight: nothing is lost, as whatever they had not
        stored yet is asked again (after a restart, the store lists the same messages)."""
        self._stopping = True
        if self._task is not None:
            await stop_task(self._task, 0)
        await self._client.aclose()

    async def run(self) -> None:
        """Scans and asks until stopped; no failure ends it."""
        try:
            while not self._stopping:
                self._wake.clear()
                now = self._now()
                if now >= self._next_scan:
                    await self._scan(now)
                self._launch(now)
                await self._rest(now)
        finally:
            for task in list(self._in_flight.values()):
                await stop_task(task, 0)

    # The schedule.

    async def _scan(self, now: float) -> None:
        """Puts every message the store says awaits "seen" on the schedule, and takes off those
        it no longer lists (seen by a push, say)."""
        since = int(now - self.settings.window)
        listed: set[str] = set()
        after = (0, 0)
        try:
            while rows := await self._read(
                functools.partial(self._store.awaiting_seen, since, after, self.settings.page)
            ):
                for row in rows:
                    listed.add(row.message_id)
                    if row.message_id not in self._entries:
                        first = row.delivered_seconds + self.settings.wait_after(0)
                        self._schedule(_Entry(first, row.message_id, row.delivered_seconds))
                after = rows[-1].key
        except StoreError as error:
            log.error("gms seen: cannot read the messages awaiting seen", extra={"error": str(error)})
            self._count("store")
            self._next_scan = now + self.settings.backoff_initial
            return
        for entry in [entry for known, entry in self._entries.items() if known not in listed]:
            if entry.message_id not in self._in_flight:
                self._drop(entry, expired=entry.delivered < since)
        self.scans += 1
        self._next_scan = now + self.settings.rescan
        self._gauge()
        await self._serving(self._serving_now is not False)

    def _schedule(self, entry: _Entry) -> None:
        self._entries[entry.message_id] = entry
        heapq.heappush(self._due, entry)

    def _launch(self, now: float) -> None:
        """Starts a request for each due message, up to the concurrency bound; drops those whose
        window has passed."""
        if now < self._paused_until:
            return
        while self._due and self._due[0].due <= now and len(self._in_flight) < self.settings.concurrency:
            entry = heapq.heappop(self._due)
            if self._entries.get(entry.message_id) is not entry:
                continue  # taken off the schedule
            if now > entry.delivered + self.settings.window:
                self._drop(entry, expired=True)
                continue
            task = asyncio.get_running_loop().create_task(self._ask(entry), name="dlrhub-gms-seen-ask")
            self._in_flight[entry.message_id] = task
            task.add_done_callback(functools.partial(self._done, entry.message_id))
        self._gauge()

    def _drop(self, entry: _Entry, *, expired: bool) -> None:
        """Takes a message off the schedule (its heap item is skipped when it comes up); `expired`:
        its window passed before it was seen."""
        del self._entries[entry.message_id]
        if expired:
            log.info("gms seen: not seen within the window", extra={"message_id": entry.message_id})
            if self._metrics is not None:
                self._metrics.gms_seen_expired.inc()

    def _done(self, message_id: str, _: asyncio.Task[None]) -> None:
        self._in_flight.pop(message_id, None)
        self._wake.set()

    async def _rest(self, now: float) -> None:
        """Waits until something may be due: a request ends, the next message or scan is due (at
        most `tick` real seconds, so that a clock that jumps is noticed), or stop."""
        upcoming = self._next_scan
        if self._due and len(self._in_flight) < self.settings.concurrency:
            upcoming = min(upcoming, max(self._paused_until, self._due[0].due))
        seconds = min(self.settings.tick, upcoming - now)
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._wake.wait()

    # One request.

    async def _ask(self, entry: _Entry) -> None:
        try:
            outcome = await self._outcome(entry)
        except Exception:
            log.exception("gms seen: unexpected failure", extra={"message_id": entry.message_id})
            outcome = "unexpected"
        self._count(outcome)
        now = self._now()
        if outcome in _PAUSING:
            self.failures += 1
            self._paused_until = now + backoff_delay(
                self.failures, self.settings.backoff_initial, self.settings.backoff_max, self._jitter
            )
            entry.due = self._paused_until  # asked again first, its count unchanged
        else:
            self.failures = 0
            entry.asks += 1
            entry.due = now + self.settings.wait_after(entry.asks)
        if outcome == "auth":
            await self._serving(False)
        elif outcome not in _PAUSING and outcome != "unexpected":
            await self._serving(True)
        if outcome in ("seen", "done"):
            self._entries.pop(entry.message_id, None)
        elif self._entries.get(entry.message_id) is entry:
            heapq.heappush(self._due, entry)
        self._gauge()

    async def _outcome(self, entry: _Entry) -> str:
        """Asks about one message and stores the answer; says what happened: seen, done (no longer
        awaiting "seen", but not seen), not_seen, auth, not_found, client_error, throttled,
        server_error, timeout, connection, body_too_large, rejected or store."""
        url = self.settings.url(entry.message_id)
        try:
            fetched = await fetch(
                self._client,
                "GET",
                url,
                deadline=self.settings.timeout,
                max_body_bytes=self.settings.max_body_bytes,
                headers=self._headers,
            )
        except FetchFailure as failure:
            log.warning("gms seen: %s", failure, extra={"url": url, "kind": failure.kind})
            return failure.kind
        status = fetched.status
        if status in (401, 403):
            log.error(
                "gms seen: GMS refused the credentials (HTTP %d); check DLRHUB_GMS_SEEN_LOGIN and"
                " DLRHUB_GMS_SEEN_PASSWORD",
                status,
                extra={"url": url},
            )
            return "auth"
        if status == 429 or status >= 500:
            log.warning("gms seen: GMS answered HTTP %d", status, extra={"url": url})
            return "throttled" if status == 429 else "server_error"
        if status != 200:
            log.warning(
                "gms seen: GMS answered HTTP %d; asking again later",
                status,
                extra={"url": url, "provider_text": fetched.body[:200].decode("utf-8", "replace")},
            )
            return "not_found" if status == 404 else "client_error"
        try:
            text = fetched.body.decode("utf-8", "replace")
            ingested = await self._writer.ingest(text, Format.FORMAT_GMS)
        except StoreError as error:
            log.error("gms seen: the answer could not be committed", extra={"error": str(error)})
            return "store"
        if ingested.rejection is not None or ingested.response.rejected_count:
            log.warning("gms seen: GMS's answer was rejected (quarantined)", extra={"url": url})
            return "rejected"
        states = await self._read(functools.partial(self._store.messages, entry.message_id, _GMS))
        state = states[0] if states else None
        if state is not None and state.status == _SEEN:
            return "seen"
        if state is not None and state.status == _DELIVERED and state.channel in SEEN_CHANNELS:
            return "not_seen"
        return "done"  # no longer awaiting "seen" (delivered by SMS after all, say)

    # Reporting.

    def _now(self) -> float:
        return self._clock() / 1e9

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.gms_seen_requests.labels(outcome).inc()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.gms_seen_awaiting.set(len(self._entries))

    async def _serving(self, serving: bool) -> None:
        if self._serving_now is serving:
            return
        self._serving_now = serving
        if self._set_serving is not None:
            await self._set_serving(serving)
