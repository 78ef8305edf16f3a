"""transport/fetching.py against the fake provider over real HTTP: one deadline for the whole request,
a capped body, backoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from dlrhub.transport.fetching import FetchFailure, backoff_delay, fetch, stop_task
from tests.fake_provider import FakeProvider, report

KEY = "k"
AUTH = {"Authorization": f"App {KEY}"}


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(KEY) as fake:
        yield fake


async def test_a_whole_answer_is_read(provider: FakeProvider) -> None:
    provider.add(report("a-1"))
    async with httpx.AsyncClient() as client:
        fetched = await fetch(
            client, "GET", provider.url + "/sms/1/reports", deadline=5, params={"limit": 5}, headers=AUTH
        )
    assert fetched.status == 200
    assert fetched.headers["Content-Type"].startswith("application/json")
    assert [r["messageId"] for r in json.loads(fetched.body)["results"]] == ["a-1"]


async def test_a_dripping_answer_meets_the_deadline_of_the_whole_request(provider: FakeProvider) -> None:
    provider.add(report("d-1"))
    provider.drip_next(1, seconds_per_byte=0.05)  # each read is quick; the whole answer takes a minute
    # httpx's own timeout (per read) never trips: only the deadline ends the request.
    async with httpx.AsyncClient(timeout=1.0) as client:
        with pytest.raises(FetchFailure) as failure:
            await fetch(client, "GET", provider.url + "/sms/1/reports", deadline=0.5, headers=AUTH)
    assert failure.value.kind == "timeout"
    assert "within 0.5 s" in str(failure.value)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_body_over_the_cap_ends_the_read(declared: bool) -> None:
    async with _big_answer(declared) as url, httpx.AsyncClient() as client:
        with pytest.raises(FetchFailure) as failure:
            await fetch(client, "GET", url, deadline=5, max_body_bytes=1000)
        # Just under the cap, the same answer is read whole.
        fetched = await fetch(client, "GET", url, deadline=5, max_body_bytes=50_000)
    assert failure.value.kind == "body_too_large"
    assert "1000-byte limit" in str(failure.value)
    assert fetched.body == b" " * 50_000


@asynccontextmanager
async def _big_answer(declared: bool) -> AsyncIterator[str]:
    """A server answering 50,000 bytes, with a Content-Length or chunked without one."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        chunk = b" " * 500
        if declared:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n" + chunk * 100)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(100):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            writer.write(b"0\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_refused_connection_is_a_connection_failure() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(FetchFailure) as failure:
            await fetch(client, "GET", "http://127.0.0.1:9/", deadline=5)
    assert failure.value.kind == "connection"


def test_backoff_doubles_to_its_cap_with_jitter_on_the_upper_half() -> None:
    delays = [backoff_delay(failures, 1.0, 10.0, lambda: 0.0) for failures in (0, 1, 2, 3, 4, 5, 1000)]
    assert delays == [0.5, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff_delay(3, 1.0, 10.0, lambda: 1.0) == 4.0


async def test_stop_task_cancels_what_does_not_end_within_the_grace() -> None:
    quick = asyncio.create_task(asyncio.sleep(0.01, "done"))
    await stop_task(quick, grace=5)
    assert quick.result() == "done"
    stuck = asyncio.create_task(asyncio.Event().wait())
    await stop_task(stuck, grace=0.05)
    assert stuck.cancelled()
