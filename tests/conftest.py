"""Shared fixtures: the real server, in-process (grpc.aio) or as a subprocess (for grpcurl)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.store.base import Store
from tools import launcher

pytest_plugins = ["tests.postgres"]  # postgres_url, postgres_db

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

ROOT = Path(__file__).resolve().parent.parent
# Copies of the two provider documents (shared/seeds), so the suite needs nothing outside the repo.
SEEDS = Path(__file__).resolve().parent / "fixtures" / "seeds"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


class FakeClock:
    """The only thing tests mock: time, in nanoseconds since the epoch."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)


@dataclass
class Running:
    """An in-process dlrhub and a client stub connected to it."""

    app: app.App
    stub: DeliveryReportServiceAsyncStub
    channel: grpc.aio.Channel
    clock: FakeClock
    address: str


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "dlrhub.db"


# The store engines a module marked `engines` runs over (pytestmark = pytest.mark.engines).
ENGINES = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_engine" in metafunc.fixturenames and metafunc.definition.get_closest_marker("engines"):
        metafunc.parametrize("db_engine", ENGINES, indirect=True)


@pytest.fixture
def db_engine(request: pytest.FixtureRequest) -> str:
    """The store engine of this test: SQLite unless its module is marked `engines`."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db(db_engine: str, request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """The `db` setting of this test's server: `tmp_path/dlrhub.db`, or a new PostgreSQL database."""
    if db_engine == "postgres":
        return str(request.getfixturevalue("postgres_db"))
    return tmp_path / "dlrhub.db"


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, clock: FakeClock | None = None, store: Store | None = None, **overrides: Any
) -> AsyncIterator[app.App]:
    """A real app on free ports over `tmp_path/dlrhub.db` (or `store`), with any Settings overridden;
    stopped after."""
    defaults: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "db": tmp_path / "dlrhub.db",
        "shutdown_grace": 1.0,
    }
    running = await app.start(Settings(**(defaults | overrides)), clock=clock or FakeClock(), store=store)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def server(tmp_path: Path, clock: FakeClock, db: str | Path) -> AsyncIterator[Running]:
    """The real server on a free port over a real SQLite file (or PostgreSQL database: `db`), with a
    grpc.aio stub."""
    async with serving(tmp_path, clock=clock, db=db) as running:
        address = f"127.0.0.1:{running.port}"
        channel = grpc.aio.insecure_channel(address)
        try:
            yield Running(running, DeliveryReportServiceStub(channel), channel, clock, address)
        finally:
            await channel.close(None)


@pytest.fixture
def server_process(db_path: Path) -> Iterator[launcher.Server]:
    """The real `dlrhub serve` process (tools/launcher.py), stopped with SIGTERM afterwards."""
    with launcher.start(db_path) as running:
        yield running


NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")


def node_executable() -> str:
    """`node`, with the npm packages the Node scripts need; fails the test with what to do if missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: install Node.js (20+) and run `make setup`")
    missing = [
        name for name in NODE_PACKAGES if not (ROOT / "node_modules" / name / "package.json").is_file()
    ]
    if missing:
        pytest.fail(f"node_modules lacks {', '.join(missing)}: run `make setup` (npm install) first")
    return node
