"""Pulls SentSMSReport reports from `GET {base_url}/sms/1/reports`.

The provider hands out each report only once. So a fetched body is staged before anything reads it
(Writer.stage: kept raw, committed durably), then written (Writer.ingest_staged: its reports, or
what is quarantined of it, commit in the transaction that unstages it), and only then is the next
request made. At start, the bodies an earlier run staged and did not write are written first. A body
that cannot be staged or committed is kept and retried; one that can never be stored (not UTF-8,
over the item limit) is quarantined whole, so no body is retried for ever. A full batch (as many
reports as `limit`) means more are waiting: the next request goes out at once.

Every request has one deadline for the whole answer and a cap on its body (transport/fetching.py).
Failures never stop the poller or the server: 401/403 are logged clearly and the poller's health
service goes NOT_SERVING; a 400 logs the provider's `serviceException.text`; 429, 5xx, timeouts,
oversized answers, connection and store errors back off exponentially, with jitter. Every failure
is retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from deliveryreport.v1.delivery_report_pb2 import Channel
from deliveryreport.v1.delivery_report_service_pb2 import Format
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.observability.metrics import Metrics
from dlrhub.store.base import StagedBody, StoreError
from dlrhub.transport.fetching import (
    DEFAULT_MAX_BODY_BYTES,
    Fetched,
    FetchFailure,
    backoff_delay,
    fetch,
    stop_task,
)
from dlrhub.write.writer import Writer

log = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_SERVICE = "dlrhub.SentSmsReportPoller"
MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class PollerSettings:
    base_url: str
    api_key: str
    # Reports per request, 1 to 1000.
    limit: int = MAX_LIMIT
    # Seconds between polls when the last batch was not full.
    interval: float = 5.0
    # Seconds a request may take in all, its answer read whole.
    timeout: float = 30.0
    # The largest answer read; a larger one is refused (logged, counted, backed off).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The channel of a report that names none (a Channel value; unspecified: SMS).
    channel: Channel.ValueType = Channel.CHANNEL_UNSPECIFIED
    # Backoff after failures: initial and maximum seconds.
    backoff_initial: float = 1.0
    backoff_max: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"the poll limit must be 1 to {MAX_LIMIT}, not {self.limit}")


class PollFailure(Exception):
    """A poll failed; `kind` is auth, client_error, throttled, server_error, timeout, connection or store."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Poller:
    def __init__(
        self,
        settings: PollerSettings,
        writer: Writer,
        *,
        client: httpx.AsyncClient | None = None,
        set_serving: Callable[[bool], Awaitable[None]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self._writer = writer
        self._client = client or httpx.AsyncClient(timeout=settings.timeout)
        self._set_serving = set_serving
        self._sleep = sleep
        self._jitter = jitter
        self._metrics = metrics
        # A fetched body not yet staged, and a staged one not yet committed: each retried before
        # anything is fetched again.
        self._fetched: tuple[bytes, str] | None = None
        self._pending: StagedBody | None = None
        # Whether the bodies staged by an earlier run are all written, and the last one looked at.
        self._replayed = False
        self._replay_after = 0
        self._resting = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="dlrhub-poller")

    async def stop(self, grace: float = 10.0) -> None:
        """Stops polling. A request in flight and its commit get up to `grace` seconds to finish;
        then they are cancelled. A body staged is never lost that way (it is written at the next
        start); one still arriving is, so the grace lets it arrive."""
        self._stopping = True
        if self._task is not None:
            if self._resting:
                self._task.cancel()
            await stop_task(self._task, grace)
        await self._client.aclose()

    async def run(self) -> None:
        """Polls until stopped; no failure ends it."""
        while not self._stopping:
            try:
                fetched = await self.poll_once()
            except PollFailure as failure:
                self.failures += 1
                self._count_failure(failure.kind)
                if failure.kind == "auth":
                    await self._serving(False)
                delay = self.backoff()
            except Exception:
                log.exception("poll: unexpected failure; retrying")
                self.failures += 1
                self._count_failure("unexpected")
                delay = self.backoff()
            else:
                self.failures = 0
                if self._metrics is not None:
                    self._metrics.poller_fetched.inc(fetched)
                    self._metrics.poller_last_success.set_to_current_time()
                await self._serving(True)
                delay = 0.0 if fetched >= self.settings.limit else self.settings.interval
            if delay and not self._stopping:
                self._resting = True
                try:
                    await self._sleep(delay)
                finally:
                    self._resting = False

    def backoff(self) -> float:
        """Exponential in the number of failures in a row, capped, with full jitter on its upper half."""
        settings = self.settings
        return backoff_delay(self.failures, settings.backoff_initial, settings.backoff_max, self._jitter)

    async def poll_once(self) -> int:
        """Writes one body, returning how many reports it held: first those a previous run staged
        and did not commit, then a newly fetched one. Raises PollFailure."""
        staged = await self._next_staged()
        replayed = staged is not None and staged.id <= self._replay_after  # staged by an earlier run
        if staged is None:
            if self._fetched is None:
                self._fetched = await self._fetch()
            body, content_type = self._fetched
            # Kept durably before anything else: the provider will not hand these reports out again.
            staged = await self._store(
                self._writer.stage(body, content_type, Format.FORMAT_SENT_SMS_REPORT, self.settings.channel),
                "fetched reports could not be staged; retrying",
            )
            self._fetched = None
            self._pending = staged
        ingested = await self._store(
            self._writer.ingest_staged(staged), "fetched reports could not be committed; retrying them"
        )
        self._pending = None
        response = ingested.response
        count = len(response.results) if ingested.rejection is None else 0
        extra: dict[str, object] = {
            "fetched": count,
            "accepted": response.accepted_count,
            "duplicate": response.duplicate_count,
            "rejected": response.rejected_count,
            "staged_id": staged.id,
        }
        if ingested.rejection is not None:
            extra["quarantined_whole"] = ErrorReason.Name(ingested.rejection.reason)
            log.error(
                "poll: a fetched body was quarantined whole: %s", ingested.rejection.description, extra=extra
            )
        else:
            log.info("poll: replayed a staged body" if replayed else "poll", extra=extra)
        return self.settings.limit if replayed else count  # after a replay, on at once

    async def _next_staged(self) -> StagedBody | None:
        """The body to write again: one staged that did not commit, from this run or (until none are
        left) a previous one."""
        if self._pending is not None or self._replayed:
            return self._pending
        while True:
            after = self._replay_after
            found = await self._store(
                self._writer.staged(after, 1), "staged bodies could not be read; retrying"
            )
            if not found:
                self._replayed = True
                return None
            self._replay_after = found[0].id
            if found[0].format == Format.FORMAT_SENT_SMS_REPORT:  # another fetcher's are its own
                self._pending = found[0]
                return self._pending

    async def _store(self, call: Awaitable[T], failed: str) -> T:
        try:
            return await call
        except StoreError as error:
            log.error("poll: %s", failed, extra={"error": str(error)})
            raise PollFailure("store", str(error)) from error

    async def _fetch(self) -> tuple[bytes, str]:
        url = self.settings.base_url.rstrip("/") + "/sms/1/reports"
        headers = {"Authorization": f"App {self.settings.api_key}", "Accept": "application/json"}
        try:
            response = await fetch(
                self._client,
                "GET",
                url,
                deadline=self.settings.timeout,
                max_body_bytes=self.settings.max_body_bytes,
                params={"limit": self.settings.limit},
                headers=headers,
            )
        except FetchFailure as failure:
            if failure.kind == "timeout":
                log.warning("poll: timed out", extra={"url": url, "error": str(failure)})
            elif failure.kind == "body_too_large":
                log.error(
                    "poll: the provider's answer is over DLRHUB_POLL_MAX_BODY_BYTES; its reports cannot"
                    " be kept",
                    extra={"url": url, "error": str(failure)},
                )
            else:
                log.warning("poll: cannot connect", extra={"url": url, "error": str(failure)})
            raise PollFailure(failure.kind, str(failure)) from failure
        status = response.status
        if status == 200:
            return response.body, response.headers.get("Content-Type", "")
        if status in (401, 403):
            log.error(
                "poll: the provider refused the API key (HTTP %d); check DLRHUB_POLL_API_KEY",
                status,
                extra={"url": url, "provider_text": _service_exception_text(response)},
            )
            raise PollFailure("auth", f"HTTP {status}")
        if status == 429 or status >= 500:
            log.warning("poll: provider answered HTTP %d", status, extra={"url": url})
            raise PollFailure("throttled" if status == 429 else "server_error", f"HTTP {status}")
        log.error(
            "poll: provider rejected the request (HTTP %d): %s",
            status,
            _service_exception_text(response),
            extra={"url": url},
        )
        raise PollFailure("client_error", f"HTTP {status}")

    def _count_failure(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.poller_failures.labels(kind).inc()

    async def _serving(self, serving: bool) -> None:
        if self._set_serving is not None:
            await self._set_serving(serving)


def _service_exception_text(response: Fetched) -> str:
    """The provider's `requestError.serviceException.text`, or the start of the body."""
    try:
        return str(json.loads(response.body)["requestError"]["serviceException"]["text"])
    except (ValueError, KeyError, TypeError):
        return response.body[:200].decode("utf-8", "replace")
