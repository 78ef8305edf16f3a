"""The SentSMSReport poller against a fake provider over real HTTP (tests/fake_provider.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from deliveryreport.v1.delivery_report_pb2 import Channel, Source
from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, RenormaliseQuarantineRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app as app_module
from dlrhub.config import Settings
from dlrhub.feed.hub import Hub
from dlrhub.normalise import Normaliser
from dlrhub.observability.metrics import Metrics
from dlrhub.store import SqliteStore
from dlrhub.store.base import StoreError
from dlrhub.transport.poller import HEALTH_SERVICE, Poller, PollerSettings
from dlrhub.write.committer import Committer
from dlrhub.write.writer import Writer
from tests.conftest import FakeClock, Running
from tests.fake_provider import FakeProvider, report
from tests.helpers import eventually, health

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

# Over SQLite and PostgreSQL, where a test has a server or a database (conftest's `db`).
pytestmark = pytest.mark.engines
KEY = "test-api-key"
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(KEY) as fake:
        yield fake


def reports(prefix: str, count: int) -> list[dict[str, Any]]:
    return [report(f"{prefix}-{i}") for i in range(count)]


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [str(item["messageId"]) for item in items]


@dataclass
class PollingApp:
    app: app_module.App
    channel: grpc.aio.Channel
    stub: DeliveryReportServiceAsyncStub


@asynccontextmanager
async def polling_app(
    db: str | Path, clock: FakeClock, provider: FakeProvider, *, fast_backoff: bool = False, **settings: Any
) -> AsyncIterator[PollingApp]:
    """The whole app, its poller pointed at the fake provider by the DLRHUB_POLL_* settings; with
    `fast_backoff`, given the same poller settings with millisecond backoff, so retries happen
    within the test."""
    configured = Settings(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        db=db,
        shutdown_grace=1.0,
        poll_base_url=provider.url,
        poll_api_key=KEY,
        **settings,
    )
    poller = None
    if fast_backoff:
        poller = PollerSettings(
            provider.url,
            KEY,
            limit=configured.poll_limit,
            interval=configured.poll_interval,
            backoff_initial=0.01,
            backoff_max=0.05,
        )
    running = await app_module.start(configured, poller_settings=poller, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield PollingApp(running, channel, DeliveryReportServiceStub(channel))
    finally:
        await channel.close(None)
        await running.stop()


def direct_poller(server: Running, provider: FakeProvider, **settings: Any) -> Poller:
    """A poller over the running server's committer, with short timeout (0.5 s) and backoff."""
    options: dict[str, Any] = {
        "limit": 10,
        "interval": 0.05,
        "timeout": 0.5,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
    }
    options.update(settings)
    writer = Writer(Normaliser.load(), server.app.committer, server.clock)
    return Poller(PollerSettings(provider.url, KEY, **options), writer)


# --- the fake provider itself ---------------------------------------------------------------------------


async def test_fake_provider_follows_the_reference_semantics(provider: FakeProvider) -> None:
    provider.add(*reports("p", 60))
    url = provider.url + "/sms/1/reports"
    auth = {"Authorization": f"App {KEY}"}
    async with httpx.AsyncClient() as http:
        missing = await http.get(url)
        assert missing.status_code == 401
        assert missing.json()["requestError"]["serviceException"]["messageId"] == "UNAUTHORIZED"
        wrong = await http.get(url, headers={"Authorization": "App nope"})
        assert wrong.status_code == 401
        for limit in ("0", "1001", "x"):
            bad = await http.get(url, params={"limit": limit}, headers=auth)
            assert bad.status_code == 400
            exception = bad.json()["requestError"]["serviceException"]
            assert exception["messageId"] == "BAD_REQUEST"
            assert "limit" in exception["text"]
        assert len(provider.pending) == 60

        default = await http.get(url, headers=auth)  # limit defaults to 50
        assert ids(default.json()["results"]) == [f"p-{i}" for i in range(50)]
        rest = await http.get(url, params={"limit": 1000}, headers=auth)
        assert ids(rest.json()["results"]) == [f"p-{i}" for i in range(50, 60)]
        empty = await http.get(url, params={"limit": 1000}, headers=auth)
        assert empty.json() == {"results": []}

        provider.fail_next(1)
        provider.throttle_next(1)
        assert (await http.get(url, headers=auth)).status_code == 500
        assert (await http.get(url, headers=auth)).status_code == 429
        provider.hang_next(1, seconds=5)
        with pytest.raises(httpx.ReadTimeout):
            await http.get(url, headers=auth, timeout=0.1)
        assert (await http.get(url, headers=auth)).status_code == 200

    assert provider.handed_out_ids() == [f"p-{i}" for i in range(60)]
    assert [r.status for r in provider.requests] == [401, 401, 400, 400, 400, 200, 200, 200, 500, 429, 0, 200]
    assert provider.requests[5].headers["authorization"] == f"App {KEY}"
    assert provider.requests[6].query == {"limit": "1000"}
    assert len(provider.requests[5].handed_out) == 50


async def test_fake_provider_filters_by_bulk_and_message_id(provider: FakeProvider) -> None:
    provider.add(report("b-1", bulk_id="B1"), report("b-2", bulk_id="B2"), report("b-3", bulk_id="B2"))
    url = provider.url + "/sms/1/reports"
    async with httpx.AsyncClient(headers={"Authorization": f"App {KEY}"}) as http:
        by_bulk = await http.get(url, params={"bulkId": "B2", "limit": 1})
        assert ids(by_bulk.json()["results"]) == ["b-2"]
        by_message = await http.get(url, params={"messageId": "b-3"})
        assert ids(by_message.json()["results"]) == ["b-3"]
    assert ids(list(provider.pending)) == ["b-1"]


# --- through the whole app -------------------------------------------------------------------------------


async def test_polled_reports_are_stored_and_fetchable(
    provider: FakeProvider, db: str | Path, clock: FakeClock
) -> None:
    provider.add(*reports("m", 3))
    async with polling_app(db, clock, provider, poll_limit=10, poll_interval=0.05) as running:
        assert running.app.poller is not None

        async def all_stored() -> bool:
            return all(running.app.store.messages(f"m-{i}") for i in range(3))

        await eventually(all_stored, within=5)
        for i in range(3):
            fetched = await running.stub.GetMessage(
                GetMessageRequest(message_id=f"m-{i}", include_history=True)
            )
            [state] = fetched.messages
            assert state.source == Source.SOURCE_SENT_SMS_REPORT
            assert state.bulk_id == "BULK-FAKE"
            assert len(fetched.history) == 1
            assert state.received_time.ToNanoseconds() == clock.now_ns
        assert await health(running.channel, HEALTH_SERVICE) == SERVING

    first = provider.requests[0]
    assert first.path == "/sms/1/reports"
    assert first.query == {"limit": "10"}
    assert first.headers["Authorization"] == f"App {KEY}"
    assert first.headers["Accept"] == "application/json"
    assert all(r.query == {"limit": "10"} for r in provider.requests)
    assert provider.handed_out_ids() == ["m-0", "m-1", "m-2"]


async def test_a_full_batch_fetches_again_at_once(
    provider: FakeProvider, db: str | Path, clock: FakeClock
) -> None:
    provider.add(*reports("f", 5))
    async with polling_app(db, clock, provider, poll_limit=2, poll_interval=30.0) as running:
        # Batches of 2, 2, 1 without waiting the 30 s interval in between.
        await eventually(lambda: all(running.app.store.messages(f"f-{i}") for i in range(5)), within=2)
        # The last batch was not full: the poller now waits the interval.
        poller = running.app.poller
        assert poller is not None
        await eventually(lambda: poller._resting, "the poller rests after a batch that was not full")
        assert [r.handed_out for r in provider.requests] == [("f-0", "f-1"), ("f-2", "f-3"), ("f-4",)]
        assert all(r.query == {"limit": "2"} for r in provider.requests)


async def test_rejected_key_goes_not_serving_logs_and_recovers(
    provider: FakeProvider,
    db: str | Path,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub")
    provider.api_key = "rotated-key"
    provider.add(report("k-1"))
    async with polling_app(
        db, clock, provider, fast_backoff=True, poll_limit=10, poll_interval=0.05
    ) as running:

        async def not_serving() -> bool:
            return await health(running.channel, HEALTH_SERVICE) == NOT_SERVING

        await eventually(not_serving, within=3)
        await eventually(lambda: len(provider.requests) >= 3, within=3)  # it keeps retrying
        assert {r.status for r in provider.requests} == {401}
        assert provider.handed_out == []
        refused = [r for r in caplog.records if "refused the API key (HTTP 401)" in r.getMessage()]
        assert refused
        assert refused[0].levelno == logging.ERROR
        assert "DLRHUB_POLL_API_KEY" in refused[0].getMessage()
        # The server itself is unaffected.
        assert await health(running.channel, "") == SERVING

        provider.api_key = KEY  # the provider accepts the key again

        async def serving() -> bool:
            return await health(running.channel, HEALTH_SERVICE) == SERVING

        await eventually(serving, within=3)
        await eventually(lambda: bool(running.app.store.messages("k-1")), within=3)


async def test_bad_request_logs_the_providers_text_and_retries(
    server: Running, provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub")
    small = FakeProvider(KEY, max_limit=100)  # this provider caps `limit` lower than the poller asks
    await small.start()
    poller = direct_poller(server, small, limit=1000)
    poller.start()
    try:
        await eventually(lambda: len(small.requests) >= 2, within=3)
        text = "limit must be a whole number from 1 to 100, not '1000'"
        logged = [r for r in caplog.records if text in r.getMessage()]
        assert logged
        assert logged[0].levelno == logging.ERROR
        assert "HTTP 400" in logged[0].getMessage()
        assert poller.failures >= 1
        assert await health(server.channel, "") == SERVING
    finally:
        await poller.stop()
        await small.stop()


async def test_a_poll_limit_over_the_batch_limit_is_refused_before_anything_starts(tmp_path: Path) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        db=tmp_path / "x.db",
        poll_base_url="http://127.0.0.1:1",
        poll_api_key="key",
        poll_limit=1000,
        max_batch_items=500,
    )
    with pytest.raises(ValueError, match="DLRHUB_POLL_LIMIT"):
        await app_module.start(settings)
    assert not (tmp_path / "x.db").exists()


# --- failures, directly against the Poller ---------------------------------------------------------------


async def test_outage_then_recovery_loses_nothing_and_stores_nothing_twice(
    server: Running, provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub")
    queued = reports("o", 10)
    provider.add(*queued)
    provider.serve_next(1)
    provider.fail_next(2, status=500)
    provider.throttle_next(2)
    provider.hang_next(2, seconds=5)
    provider.serve_next(1)
    provider.fail_next(1, status=503)
    poller = direct_poller(server, provider, limit=3)
    poller.start()
    try:
        store = server.app.store
        await eventually(lambda: all(store.messages(m) for m in ids(queued)), within=8)
        await eventually(lambda: poller.failures == 0 and not provider.pending, within=2)
    finally:
        await poller.stop()

    for message_id in ids(queued):
        fetched = await server.stub.GetMessage(GetMessageRequest(message_id=message_id, include_history=True))
        assert len(fetched.messages) == 1
        assert len(fetched.history) == 1, message_id
    assert sorted(provider.handed_out_ids()) == sorted(ids(queued))
    assert len(store.changes(0, 100)) == 10  # each once
    statuses = [r.status for r in provider.requests]
    assert statuses[:8] == [200, 500, 500, 429, 429, 0, 0, 200]
    assert statuses[8] == 503
    messages = caplog.text
    assert "poll: provider answered HTTP 500" in messages
    assert "poll: provider answered HTTP 429" in messages
    assert "poll: timed out" in messages
    assert await health(server.channel, "") == SERVING


class FlakyStore(SqliteStore):
    """A SQLite store whose transactions raise StoreError from the `first_failure`-th (counted from 1),
    `failures` times."""

    def __init__(self, path: Path, failures: int, first_failure: int = 1) -> None:
        super().__init__(path)
        self.failures = failures
        self.first_failure = first_failure
        self.attempts = 0

    def transaction(self) -> Any:
        self.attempts += 1
        if self.attempts >= self.first_failure and self.failures > 0:
            self.failures -= 1
            raise StoreError("disk unavailable")
        return super().transaction()


# The poller's transactions: it looks for staged bodies (1), stages the fetched one (2), commits it (3).
@pytest.mark.parametrize(
    ("first_failure", "logged"),
    [(2, "could not be staged"), (3, "could not be committed")],
    ids=["staging", "commit"],
)
async def test_a_batch_that_cannot_be_committed_is_kept_and_retried(
    provider: FakeProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture, first_failure: int, logged: str
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub")
    queued = reports("s", 4)
    provider.add(*queued)
    store = FlakyStore(tmp_path / "flaky.db", failures=2, first_failure=first_failure)
    committer = Committer(store, Hub().publish)
    committer.start()
    writer = Writer(Normaliser.load(), committer, FakeClock())
    poller = Poller(
        PollerSettings(provider.url, KEY, limit=10, interval=30.0, backoff_initial=0.01, backoff_max=0.05),
        writer,
    )
    poller.start()
    try:
        await eventually(lambda: all(store.messages(m) for m in ids(queued)), within=3)
        # Written on the third attempt, from the batch fetched once: no second request was made
        # (the 30 s interval follows the commit).
        assert store.attempts == 5
        assert len(provider.requests) == 1
        assert provider.handed_out_ids() == ids(queued)
        for message_id in ids(queued):
            assert len(store.history(message_id)) == 1
        kept = [r for r in caplog.records if logged in r.getMessage()]
        assert len(kept) == 2
        with store.transaction() as tx:
            assert tx.staged(0, 10) == []  # unstaged with its reports
    finally:
        await poller.stop()
        await committer.stop()
        store.close()


class GatedStore(SqliteStore):
    """A SQLite store whose transactions wait (on the writer thread) until the gate opens."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def transaction(self) -> Any:
        self.entered.set()
        self.gate.wait(timeout=10)
        return super().transaction()


async def test_stop_during_a_commit_finishes_the_commit(provider: FakeProvider, tmp_path: Path) -> None:
    queued = reports("c", 2)
    provider.add(*queued)
    store = GatedStore(tmp_path / "gated.db")
    committer = Committer(store, Hub().publish)
    committer.start()
    writer = Writer(Normaliser.load(), committer, FakeClock())
    poller = Poller(PollerSettings(provider.url, KEY, limit=10, interval=30.0), writer)
    poller.start()
    try:
        await eventually(store.entered.is_set, within=3)  # fetched, and committing
        stopping = asyncio.create_task(poller.stop())
        await eventually(lambda: poller._stopping, "the stop begins")
        assert not stopping.done()  # the stop waits for the commit
        store.gate.set()
        await asyncio.wait_for(stopping, 3)
        assert provider.handed_out_ids() == ids(queued)
        for message_id in ids(queued):
            assert len(store.history(message_id)) == 1
        assert len(provider.requests) == 1
    finally:
        store.gate.set()
        await poller.stop()
        await committer.stop()
        store.close()


async def test_the_loop_backs_off_exponentially_and_resets_after_a_success(
    server: Running, provider: FakeProvider
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0.001)

    serving: list[bool] = []

    async def set_serving(value: bool) -> None:
        serving.append(value)

    provider.fail_next(3, status=500)
    provider.serve_next(1)
    provider.fail_next(4, status=401)
    writer = Writer(Normaliser.load(), server.app.committer, server.clock)
    poller = Poller(
        PollerSettings(provider.url, KEY, limit=10, interval=7.0, backoff_initial=0.01, backoff_max=0.05),
        writer,
        set_serving=set_serving,
        sleep=sleep,
        jitter=lambda: 0.5,
    )
    poller.start()
    try:
        await eventually(lambda: len(slept) >= 9, within=3)
    finally:
        await poller.stop()

    # Three 500s: 3/4 of 0.01, 0.02, 0.04 (the jitter is fixed at 0.5); a success waits the interval;
    # four 401s start again from the initial backoff, the fourth capped at 3/4 of 0.05; then the interval.
    assert slept[:9] == pytest.approx([0.0075, 0.015, 0.03, 7.0, 0.0075, 0.015, 0.03, 0.0375, 7.0])
    # Only the 401s take the poller out of service; the next success puts it back.
    assert serving[:6] == [True, False, False, False, False, True]
    assert [r.status for r in provider.requests[:9]] == [500, 500, 500, 200, 401, 401, 401, 401, 200]


async def test_backoff_is_exponential_with_jitter_and_capped(tmp_path: Path) -> None:
    jitter = 0.0

    def fixed_jitter() -> float:
        return jitter

    store = SqliteStore(tmp_path / "unused.db")
    writer = Writer(Normaliser.load(), Committer(store, Hub().publish), FakeClock())
    poller = Poller(
        PollerSettings("http://127.0.0.1:9", KEY, backoff_initial=1.0, backoff_max=10.0),
        writer,
        jitter=fixed_jitter,
    )
    try:

        def backoffs() -> list[float]:
            values = []
            for failures in (0, 1, 2, 3, 4, 5, 6, 1000):
                poller.failures = failures
                values.append(poller.backoff())
            return values

        # The ceiling doubles per failure (1, 2, 4, 8, then the 10 s cap); the wait is its upper half.
        assert backoffs() == [0.5, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
        jitter = 0.5
        assert backoffs() == [0.75, 0.75, 1.5, 3.0, 6.0, 7.5, 7.5, 7.5]
        jitter = 1.0
        assert backoffs() == [1.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    finally:
        await poller.stop()
        store.close()


# --- nothing wedges the poller (#19.5) -------------------------------------------------------------------


def results_body(*items: dict[str, Any]) -> bytes:
    return json.dumps({"results": list(items)}).encode()


def open_items(store: SqliteStore | Any) -> list[Any]:
    return [item for _, item in store.quarantined(0, 100, include_resolved=False)]


def staged(store: Any) -> list[Any]:
    with store.transaction() as tx:
        return list(tx.staged(0, 100))


async def test_a_batch_over_the_item_limit_is_quarantined_whole_and_the_poller_moves_on(
    provider: FakeProvider, db: str | Path, clock: FakeClock
) -> None:
    # The provider hands out more than the poller asked for: more than the server takes in one batch.
    provider.answer_next(results_body(*reports("big", 8)))
    provider.add(*reports("after", 2))
    async with polling_app(
        db, clock, provider, fast_backoff=True, max_batch_items=5, poll_limit=5, poll_interval=0.05
    ) as running:
        store = running.app.store
        await eventually(lambda: all(store.messages(m) for m in ("after-0", "after-1")), within=5)
        [item] = open_items(store)
        assert (item.reason, item.whole_payload, item.received_count) == ("TOO_MANY_ITEMS", True, 1)
        assert "more than 5 items in one fetched body (DLRHUB_MAX_BATCH_ITEMS)" in item.description
        assert json.loads(item.raw) == {"results": reports("big", 8)}  # kept whole, as it came
        assert staged(store) == []
        # Run again (whatever the limit), every report of it is stored.
        response = await running.stub.RenormaliseQuarantine(RenormaliseQuarantineRequest())
        assert response.resolved_count == 1
        assert all(store.messages(f"big-{i}") for i in range(8))


async def test_a_lone_surrogate_under_charset_unicode_escape_quarantines_its_item_only(
    provider: FakeProvider, db: str | Path, clock: FakeClock
) -> None:
    """#19.5: read with the charset it declared, the body held a lone surrogate that nothing could
    store, and the poller retried it for ever."""
    good = report("ue-good")
    body = results_body(good, report("\\ud800-bad")).replace(b"\\\\ud800", b"\\ud800")
    assert b'"messageId": "\\ud800-bad"' in body  # a JSON escape, as the provider wrote it
    provider.answer_next(body, content_type="application/json; charset=unicode_escape")
    provider.add(report("ue-after"))
    async with polling_app(
        db, clock, provider, fast_backoff=True, poll_limit=10, poll_interval=0.05
    ) as running:
        store = running.app.store
        await eventually(lambda: bool(store.messages("ue-after")), within=5)
        assert store.messages("ue-good")
        [item] = open_items(store)
        assert (item.field, item.reason, item.whole_payload) == (
            "results[1].messageId",
            "INVALID_VALUE",
            False,
        )
        assert "unpaired surrogate" in item.description
        assert staged(store) == []


async def test_a_body_that_is_not_utf8_is_quarantined_whole_and_readable(
    provider: FakeProvider, db: str | Path, clock: FakeClock
) -> None:
    body = results_body(report("latin-1")).replace(b"41793026727", b"41793\xe9\xed\xa0\x80")
    provider.answer_next(body, content_type="application/json; charset=iso-8859-1")
    provider.add(report("u-after"))
    async with polling_app(
        db, clock, provider, fast_backoff=True, poll_limit=10, poll_interval=0.05
    ) as running:
        store = running.app.store
        await eventually(lambda: bool(store.messages("u-after")), within=5)
        [item] = open_items(store)
        assert (item.reason, item.whole_payload) == ("INVALID_UTF8", True)
        assert "41793\\xe9\\xed\\xa0\\x80" in item.raw  # every byte kept, readable
        assert item.received_time().ToNanoseconds() == clock.now_ns
        assert staged(store) == []


async def test_every_request_has_one_deadline_for_the_whole_answer(
    server: Running, provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub")
    provider.drip_next(1, seconds_per_byte=0.02)  # an empty answer, a byte every 20 ms: ~0.3 s
    provider.serve_next(1)
    poller = direct_poller(server, provider, timeout=0.15, interval=30.0)
    poller.start()
    try:
        await eventually(lambda: len(provider.requests) >= 2, within=5)
    finally:
        await poller.stop()
    timed_out = [r for r in caplog.records if r.getMessage() == "poll: timed out"]
    assert timed_out
    assert "within 0.15 s" in str(timed_out[0].__dict__["error"])


async def test_an_answer_over_the_body_cap_is_not_read_and_the_poller_backs_off(
    server: Running, provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub")
    metrics = Metrics()
    provider.answer_next(results_body(*reports("huge", 50)))
    provider.add(*reports("small", 1))
    writer = Writer(Normaliser.load(), server.app.committer, server.clock)
    settings = PollerSettings(
        provider.url,
        KEY,
        limit=10,
        interval=30.0,
        backoff_initial=0.01,
        backoff_max=0.05,
        max_body_bytes=2000,
    )
    poller = Poller(settings, writer, metrics=metrics)
    poller.start()
    try:
        await eventually(lambda: bool(server.app.store.messages("small-0")), within=5)
    finally:
        await poller.stop()
    refused = [r for r in caplog.records if "over DLRHUB_POLL_MAX_BODY_BYTES" in r.getMessage()]
    assert refused
    assert refused[0].levelno == logging.ERROR
    assert metrics.registry.get_sample_value("dlrhub_poller_failures_total", {"kind": "body_too_large"}) == 1
    assert [r.status for r in provider.requests[:2]] == [200, 200]


# --- the channel the polled endpoint serves (#16.3) ------------------------------------------------------


async def test_the_poller_gives_its_channel_to_reports_that_name_none(
    provider: FakeProvider, db: str | Path, clock: FakeClock
) -> None:
    provider.add(report("wa-1"), {**report("named-1"), "channel": "VIBER"})
    async with polling_app(
        db, clock, provider, poll_limit=10, poll_interval=0.05, poll_channel="whatsapp"
    ) as running:
        store = running.app.store
        await eventually(lambda: bool(store.messages("wa-1") and store.messages("named-1")), within=5)
        assert store.messages("wa-1")[0].channel == Channel.CHANNEL_WHATSAPP
        assert store.messages("named-1")[0].channel == Channel.CHANNEL_VIBER


async def test_an_unknown_poll_channel_is_refused_before_anything_starts(tmp_path: Path) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        db=tmp_path / "x.db",
        poll_base_url="http://127.0.0.1:1",
        poll_api_key="key",
        poll_channel="pigeon",
    )
    with pytest.raises(
        ValueError, match="DLRHUB_POLL_CHANNEL: no channel is called 'pigeon'; the channels are sms"
    ):
        await app_module.start(settings)
    assert not (tmp_path / "x.db").exists()


class Breaking(Normaliser):
    """A normaliser with a bug: it raises on any payload that mentions "boom"."""

    def normalise(self, payload: str, *args: Any, **kwargs: Any) -> Any:
        if "boom" in payload:
            raise RuntimeError("a bug")
        return super().normalise(payload, *args, **kwargs)


async def test_a_body_the_normaliser_breaks_on_is_quarantined_whole_not_retried_for_ever(
    server: Running, provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    normaliser = Normaliser.load()
    provider.add(report("boom-1"), report("fine-1"))  # one a request
    writer = Writer(
        Breaking(normaliser.gms_table, normaliser.sent_sms_report_table), server.app.committer, server.clock
    )
    poller = Poller(PollerSettings(provider.url, KEY, limit=1, interval=0.05), writer)
    poller.start()
    try:
        await eventually(lambda: bool(server.app.store.messages("fine-1")), within=5)
    finally:
        await poller.stop()
    [item] = open_items(server.app.store)
    assert (item.reason, item.whole_payload) == ("INTERNAL", True)
    assert json.loads(item.raw) == {"results": [report("boom-1")]}
    assert poller.failures == 0
    assert any("could not be normalised" in r.getMessage() for r in caplog.records)
    assert staged(server.app.store) == []
