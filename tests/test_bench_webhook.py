"""The benchmark's webhook load (bench/load.py, kind "webhook") against a real dlrhub and against the
echo's do-nothing handler (bench/echo_server.py): it must count only the POSTs answered 200, check
what dlrhub accepted, and count every other answer as an error, or the webhook figures would lie."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bench import echo_server, load
from dlrhub.config import Settings
from tests.conftest import Running

WINDOW = 1.0  # seconds


def webhook_job(url: str, payload: str, **extra: Any) -> load.Job:
    return {
        "kind": "webhook",
        "url": url,
        "payload": payload,
        "batch": 10,
        "concurrency": 4,
        "start_at": time.time() + 0.2,
        "warmup": 0.1,
        "duration": WINDOW,
        "tag": "benchtest",
        "worker_index": 0,
        **extra,
    }


@pytest.fixture
async def echo_url() -> AsyncIterator[str]:
    listener = echo_server.webhooks(Settings())
    await listener.start("127.0.0.1:0")
    try:
        yield f"http://127.0.0.1:{listener.port}"
    finally:
        await listener.stop()


@pytest.mark.parametrize(("payload", "reports"), [("ingest", 1), ("batch", 10)])
async def test_every_post_counted_was_stored_by_dlrhub(server: Running, payload: str, reports: int) -> None:
    before = server.app.store.latest_cursor()
    url = f"http://127.0.0.1:{server.app.http_port}/webhooks/gms"
    result = await load.run(webhook_job(url, payload, count_accepted=True))
    assert result["errors"] == {}
    assert result["calls"] > 0
    assert result["items"] == result["calls"] * reports
    assert result["not_accepted"] == 0
    # The window counts a subset of the POSTs answered: all of them were stored, none twice.
    stored = server.app.store.latest_cursor() - before
    assert stored >= result["items"]
    assert stored % reports == 0


async def test_the_echo_answers_without_storing_and_other_answers_are_errors(echo_url: str) -> None:
    result = await load.run(webhook_job(f"{echo_url}/webhooks/gms", "batch"))
    assert (result["errors"], result["not_accepted"]) == ({}, 0)
    assert result["calls"] > 0
    assert result["items"] == result["calls"] * 10

    result = await load.run(webhook_job(f"{echo_url}/webhooks/nowhere", "ingest"))
    assert result["calls"] == 0
    assert set(result["errors"]) == {"HTTP 404"}
