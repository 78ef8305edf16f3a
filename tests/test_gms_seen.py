"""The GMS seen fetcher against a fake GMS over real HTTP (tests/fake_gms.py), in the real app.

Only the clock is fake: the fetcher's schedule (intervals, backoff, the window) runs on it, so a
test moves it on to make a request due; the fetcher looks at it every `tick` (10 ms) of real time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub import app as app_module
from dlrhub.transport.gms_seen import HEALTH_SERVICE, GmsSeenFetcher, GmsSeenSettings
from tests.conftest import FakeClock, serving
from tests.fake_gms import LOGIN, PASSWORD, FakeGms, seen_code_table
from tests.helpers import GMS, eventually, health, status

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
INTERVAL = 60.0
RESCAN = 30.0


@pytest.fixture
async def gms() -> AsyncIterator[FakeGms]:
    async with FakeGms() as fake:
        yield fake


@dataclass
class Seeing:
    """The app with its seen fetcher pointed at the fake GMS."""

    app: app_module.App
    clock: FakeClock
    gms: FakeGms
    channel: grpc.aio.Channel

    @property
    def fetcher(self) -> GmsSeenFetcher:
        assert self.app.gms_seen is not None
        return self.app.gms_seen

    def now_ms(self) -> int:
        return self.clock() // 1_000_000

    async def delivered(self, message_id: str, channel: str) -> None:
        """GMS delivers the message and pushes its report (stored through the one write path)."""
        push = self.gms.deliver(message_id, channel, self.now_ms())
        ingested = await self.app.writer.ingest(json.dumps(push), Format.FORMAT_GMS)
        assert ingested.response.accepted_count == 1

    def state(self, message_id: str) -> DeliveryReport:
        [state] = self.app.store.messages(message_id, GMS)
        return state

    def counted(self, outcome: str) -> float:
        value = self.app.metrics.registry.get_sample_value(
            "dlrhub_gms_seen_requests_total", {"outcome": outcome}
        )
        return value or 0.0

    def metric(self, name: str) -> float:
        return self.app.metrics.registry.get_sample_value(name) or 0.0

    async def health(self) -> int | None:
        return await health(self.channel, HEALTH_SERVICE)

    async def advance_until(self, seconds: float, condition: Any, what: str) -> None:
        """Moves the clock on by `seconds`, then waits for `condition`."""
        self.clock.advance(seconds)
        await eventually(condition, what)


@asynccontextmanager
async def seeing(
    tmp_path: Path, clock: FakeClock, gms: FakeGms, db: str | Path | None = None, **settings: Any
) -> AsyncIterator[Seeing]:
    """The app over `db` (the `db` fixture: SQLite or PostgreSQL; default SQLite in `tmp_path`)."""
    options: dict[str, Any] = {
        "interval": INTERVAL,
        "interval_max": 600.0,
        "window": 3600.0,
        "rescan": RESCAN,
        "backoff_initial": 10.0,
        "backoff_max": 100.0,
        "timeout": 5.0,
        "tick": 0.01,
    }
    options.update(settings)
    fetcher = GmsSeenSettings(gms.base_url, LOGIN, PASSWORD, **options)
    async with serving(
        tmp_path,
        clock=clock,
        db=db or tmp_path / "dlrhub.db",
        gms_codes=seen_code_table(tmp_path),
        gms_seen_settings=fetcher,
    ) as running:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            yield Seeing(running, clock, gms, channel)
        finally:
            await channel.close(None)


@pytest.mark.engines
async def test_delivered_viber_and_whatsapp_messages_become_seen_and_nothing_else_is_asked(
    tmp_path: Path, clock: FakeClock, gms: FakeGms, db: str | Path
) -> None:
    async with seeing(tmp_path, clock, gms, db) as s:
        await eventually(lambda: _is(s.health(), SERVING), "SERVING after the first scan")
        await s.delivered("viber-1", "viber")
        await s.delivered("whatsapp-1", "whatsapp")
        await s.delivered("sms-1", "sms")  # SMS reports no "seen": never asked about
        await s.delivered("seen-1", "viber")
        gms.see("seen-1", s.now_ms())
        pushed_seen = gms.attempts["seen-1"] | {"number": "380961111111", "sent_via": "viber"}
        await s.app.writer.ingest(json.dumps(pushed_seen), Format.FORMAT_GMS)  # seen by a push
        assert s.state("seen-1").status == status("SEEN")
        gms.see("viber-1", s.now_ms() + 5_000)

        # Due a minute after delivery: GMS says the Viber message was seen, not yet the WhatsApp one.
        await s.advance_until(INTERVAL, lambda: s.counted("seen") + s.counted("not_seen") == 2, "both")
        assert s.state("viber-1").status == status("SEEN")
        assert s.state("viber-1").event_time.ToMilliseconds() == s.now_ms() - 55_000
        assert s.state("whatsapp-1").status == status("DELIVERED")
        assert {request.message_id for request in gms.requests} == {"viber-1", "whatsapp-1"}
        assert {request.report for request in gms.requests} == {"advanced"}
        assert s.counted("seen") == 1
        assert s.metric("dlrhub_gms_seen_awaiting") == 1

        # Asked again twice the interval later: seen now; then nothing is left to ask about.
        gms.see("whatsapp-1", s.now_ms())
        await s.advance_until(2 * INTERVAL, lambda: s.counted("seen") == 2, "WhatsApp seen")
        assert s.state("whatsapp-1").status == status("SEEN")
        assert [request.message_id for request in gms.requests].count("whatsapp-1") == 2
        assert s.metric("dlrhub_gms_seen_awaiting") == 0
        assert s.fetcher.awaiting == 0
        assert await s.health() == SERVING


async def test_refused_credentials_make_it_not_serving_until_they_work_again(
    tmp_path: Path, clock: FakeClock, gms: FakeGms
) -> None:
    gms.password = "changed-at-gms"
    async with seeing(tmp_path, clock, gms) as s:
        await s.delivered("viber-1", "viber")
        gms.see("viber-1", s.now_ms())
        await s.advance_until(INTERVAL, lambda: s.counted("auth") == 1, "the 401 counted")
        assert [request.status for request in gms.requests] == [401]
        await eventually(lambda: _is(s.health(), NOT_SERVING), "NOT_SERVING")
        # Every request waits out the backoff (half to all of 10 s after one failure).
        assert s.fetcher.paused_until >= s.clock() / 1e9 + 5

        gms.password = PASSWORD
        await s.advance_until(11, lambda: s.counted("seen") == 1, "asked again and seen")
        assert s.state("viber-1").status == status("SEEN")
        await eventually(lambda: _is(s.health(), SERVING), "SERVING again")


async def test_server_errors_back_off_exponentially_then_it_succeeds(
    tmp_path: Path, clock: FakeClock, gms: FakeGms
) -> None:
    async with seeing(tmp_path, clock, gms) as s:
        await s.delivered("viber-1", "viber")
        gms.see("viber-1", s.now_ms())
        gms.fail_next(2, 500)
        await s.advance_until(INTERVAL, lambda: s.counted("server_error") == 1, "the first 500")
        first_pause = s.fetcher.paused_until - s.clock() / 1e9
        assert 5 <= first_pause <= 10
        assert len(gms.requests) == 1  # nothing more until the pause is over
        await s.advance_until(first_pause + 1, lambda: s.counted("server_error") == 2, "the second 500")
        second_pause = s.fetcher.paused_until - s.clock() / 1e9
        assert 10 <= second_pause <= 20  # doubled
        await s.advance_until(second_pause + 1, lambda: s.counted("seen") == 1, "seen after the errors")
        assert [request.status for request in gms.requests] == [500, 500, 200]
        assert s.fetcher.failures == 0
        assert await s.health() == SERVING


async def test_a_request_that_hangs_is_ended_by_its_deadline(
    tmp_path: Path, clock: FakeClock, gms: FakeGms
) -> None:
    async with seeing(tmp_path, clock, gms, timeout=0.2) as s:
        await s.delivered("viber-1", "viber")
        gms.see("viber-1", s.now_ms())
        gms.hang_next(1, seconds=30)
        await s.advance_until(INTERVAL, lambda: s.counted("timeout") == 1, "the deadline")
        assert s.state("viber-1").status == status("DELIVERED")
        await s.advance_until(11, lambda: s.counted("seen") == 1, "asked again after the backoff")
        assert s.state("viber-1").status == status("SEEN")


async def test_a_message_gms_does_not_know_is_asked_again_later_without_holding_up_the_others(
    tmp_path: Path, clock: FakeClock, gms: FakeGms
) -> None:
    async with seeing(tmp_path, clock, gms) as s:
        await s.delivered("unknown-1", "viber")
        del gms.attempts["unknown-1"]  # GMS answers 404
        await s.delivered("viber-1", "viber")
        gms.see("viber-1", s.now_ms())
        await s.advance_until(INTERVAL, lambda: s.counted("seen") == 1, "the known one seen")
        await eventually(lambda: s.counted("not_found") == 1, "the 404 counted")
        assert s.fetcher.paused_until == 0  # nothing paused
        assert s.fetcher.awaiting == 1
        await s.advance_until(2 * INTERVAL, lambda: s.counted("not_found") == 2, "asked again")
        assert [request.status for request in gms.requests if request.message_id == "unknown-1"] == [404, 404]
        assert await s.health() == SERVING


async def test_a_message_never_seen_is_asked_on_a_growing_interval_until_the_window_passes(
    tmp_path: Path, clock: FakeClock, gms: FakeGms
) -> None:
    async with seeing(tmp_path, clock, gms) as s:
        await s.delivered("viber-1", "viber")
        # From delivery: 60 s, then intervals doubling from 120 s up to 600 s, within the 3600-s window.
        asked_at = [60, 180, 420, 900, 1500, 2100, 2700, 3300]
        elapsed = 0
        for count, due in enumerate(asked_at, start=1):
            await s.advance_until(due - elapsed, _answered(s, count), f"ask {count}")
            elapsed = due
        assert len(gms.asked()) == len(asked_at)

        await s.advance_until(600, lambda: s.metric("dlrhub_gms_seen_expired_total") == 1, "dropped")
        assert s.fetcher.awaiting == 0
        assert s.metric("dlrhub_gms_seen_awaiting") == 0
        scans = s.fetcher.scans
        await s.advance_until(RESCAN, lambda: s.fetcher.scans > scans, "another scan")
        assert s.fetcher.awaiting == 0  # past its window, the store no longer lists it
        assert len(gms.requests) == len(asked_at)
        assert s.state("viber-1").status == status("DELIVERED")


async def test_requests_in_flight_never_exceed_the_concurrency(
    tmp_path: Path, clock: FakeClock, gms: FakeGms
) -> None:
    async with seeing(tmp_path, clock, gms, concurrency=3) as s:
        ids = [f"viber-{number}" for number in range(10)]
        for message_id in ids:
            await s.delivered(message_id, "viber")
            gms.see(message_id, s.now_ms())
        gms.delay = 0.05
        await s.advance_until(INTERVAL, lambda: s.counted("seen") == len(ids), "all seen")
        assert gms.max_in_flight == 3
        assert sorted(request.message_id for request in gms.requests) == sorted(ids)


@pytest.mark.engines
async def test_the_schedule_is_found_again_after_a_restart(
    tmp_path: Path, clock: FakeClock, gms: FakeGms, db: str | Path
) -> None:
    async with seeing(tmp_path, clock, gms, db) as s:
        await s.delivered("viber-1", "viber")
    gms.see("viber-1", clock() // 1_000_000)
    async with seeing(tmp_path, clock, gms, db, report="simple") as s:
        await s.advance_until(INTERVAL, lambda: s.counted("seen") == 1, "asked after the restart")
        assert [request.report for request in gms.requests] == ["simple"]
        assert s.state("viber-1").status == status("SEEN")


async def test_it_is_off_unless_configured_and_refuses_a_base_url_without_credentials(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as running:
        assert running.gms_seen is None
    with pytest.raises(ValueError, match="DLRHUB_GMS_SEEN_LOGIN and DLRHUB_GMS_SEEN_PASSWORD"):
        async with serving(tmp_path, gms_seen_base_url="https://dr-v2.hyber.im/1234"):
            pass
    with pytest.raises(ValueError, match="DLRHUB_GMS_SEEN_REPORT must be one of advanced, simple"):
        async with serving(
            tmp_path,
            gms_seen_base_url="https://dr-v2.hyber.im/1234",
            gms_seen_login="l",
            gms_seen_password="p",
            gms_seen_report="detailed",
        ):
            pass
    async with serving(
        tmp_path,
        gms_seen_base_url="https://dr-v2.hyber.im/1234/",
        gms_seen_login="l",
        gms_seen_password="p",
        gms_seen_window=7200.0,
        gms_seen_concurrency=2,
    ) as running:
        assert running.gms_seen is not None
        settings = running.gms_seen.settings
        assert settings.url("a/b c") == "https://dr-v2.hyber.im/1234/api/dr/a%2Fb%20c/advanced"
        assert (settings.window, settings.concurrency) == (7200.0, 2)


def _answered(s: Seeing, count: int) -> Any:
    """Whether `count` answers "not seen yet" have been stored (and the next request scheduled)."""
    return lambda: s.counted("not_seen") == count


async def _is(check: Any, expected: int) -> bool:
    return bool(await check == expected)
