"""The poller in a real `dlrhub serve` process against the fake provider on 127.0.0.1: a kill -9
between fetching a batch and committing it loses nothing (#19.4), on either engine, and SIGTERM stops
the server while a provider drips its answer (#19.5)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fake_provider import FakeProvider, report
from tools import launcher

KEY = "process-key"
BATCH = 1000


def poller_env(provider: FakeProvider, **settings: str) -> Mapping[str, str]:
    return {
        **os.environ,
        "DLRHUB_POLL_BASE_URL": provider.url,
        "DLRHUB_POLL_API_KEY": KEY,
        "DLRHUB_POLL_LIMIT": str(BATCH),
        "DLRHUB_POLL_INTERVAL": "0.05",
        **settings,
    }


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(KEY) as fake:
        yield fake


@dataclass(frozen=True)
class Database:
    """A database of one engine, as the server names it (`--db`) and as the test reaches it."""

    target: str
    connect: Callable[[], Any]
    # Begins a transaction holding the lock that keeps every write out (SQLite), or every write of
    # staged rows (PostgreSQL: staging and the commit that unstages them).
    lock: tuple[str, ...]
    # Raised while the schema is not there yet.
    not_ready: type[Exception]

    @contextlib.contextmanager
    def connected(self) -> Iterator[Any]:
        connection = self.connect()
        try:
            yield connection
        finally:
            connection.close()

    def count(self, table: str) -> int:
        with self.connected() as connection:
            return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _sqlite(tmp_path: Path) -> Database:
    path = tmp_path / "poller.db"
    return Database(
        str(path),
        lambda: sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False),
        ("BEGIN IMMEDIATE",),
        sqlite3.OperationalError,
    )


def _postgres(url: str) -> Database:
    return Database(
        url,
        lambda: psycopg.connect(url, autocommit=True),
        ("BEGIN", "LOCK TABLE staged IN EXCLUSIVE MODE"),
        psycopg.errors.UndefinedTable,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        return _sqlite(tmp_path)
    return _postgres(request.getfixturevalue("postgres_db"))


def hold_once_staged(db: Database, connection: Any, given_up: threading.Event) -> bool:
    """Takes the lock, again and again, until a staged batch (not an empty poll) is in the
    database, and keeps it then: from there, its reports cannot commit. False when `given_up` first."""
    while not given_up.is_set():
        with contextlib.suppress(db.not_ready):  # not created or migrated yet
            for statement in db.lock:
                connection.execute(statement)
            staged = connection.execute("SELECT count(*) FROM staged WHERE length(body) > 1000")
            if staged.fetchone()[0]:
                return True
        connection.execute("ROLLBACK")
        given_up.wait(0.001)
    return False


async def test_a_batch_fetched_but_not_committed_survives_kill_9(
    provider: FakeProvider, database: Database
) -> None:
    batch = [report(f"k-{i}") for i in range(BATCH)]
    provider.add(*batch)
    given_up = threading.Event()
    with database.connected() as lock:
        holding = asyncio.create_task(asyncio.to_thread(hold_once_staged, database, lock, given_up))
        server = await asyncio.to_thread(launcher.start, database.target, env=poller_env(provider))
        try:
            # The provider has handed the batch out; the server staged it and now waits on the lock.
            try:
                assert await asyncio.wait_for(holding, 30), "no batch was staged"
            finally:
                given_up.set()
            assert provider.handed_out_ids() == [f"k-{i}" for i in range(BATCH)]
            await asyncio.to_thread(server.stop, signal.SIGKILL, 10)
        finally:
            given_up.set()
            server.stop(signal.SIGKILL, 10)
        # Killed between the two commits: the batch is staged, none of its reports stored.
        assert database.count("staged") >= 1
        assert database.count("reports") == 0
        lock.execute("ROLLBACK")

    server = await asyncio.to_thread(launcher.start, database.target, env=poller_env(provider))
    try:
        for _ in range(300):
            if database.count("messages") == BATCH and database.count("staged") == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        assert await asyncio.to_thread(server.stop) == 0
    # Every report the provider handed out once is stored once, and nothing is left staged.
    assert database.count("messages") == BATCH
    assert database.count("reports") == BATCH
    assert database.count("staged") == 0
    assert provider.handed_out_ids() == [f"k-{i}" for i in range(BATCH)]
    assert "replayed a staged body" in "\n".join(server.output.stdout) + "\n".join(server.output.stderr)


async def test_sigterm_stops_the_server_while_a_provider_drips_its_answer(
    provider: FakeProvider, tmp_path: Path
) -> None:
    provider.add(report("d-1"))
    provider.drip_next(1, seconds_per_byte=0.5)  # each read is quick: httpx's own timeouts never trip
    env = poller_env(provider, DLRHUB_POLL_TIMEOUT="3600", DLRHUB_SHUTDOWN_GRACE="1")
    server = await asyncio.to_thread(launcher.start, tmp_path / "drip.db", env=env)
    try:
        for _ in range(300):
            if provider.requests:
                break
            await asyncio.sleep(0.05)
        assert provider.handed_out_ids() == ["d-1"]  # its answer is dripping now
    finally:
        # Past its 1 s grace the poll is cancelled and the server exits on its own (not killed).
        code = await asyncio.to_thread(server.stop, signal.SIGTERM, 20)
    assert code == 0
