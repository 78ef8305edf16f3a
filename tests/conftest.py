"""Shared fixtures: the real server, in-process (grpc.aio) or as a subprocess (for grpcurl)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings

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


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, clock: FakeClock | None = None, **overrides: Any
) -> AsyncIterator[app.App]:
    """A real app on free ports over `tmp_path/dlrhub.db`, with any Settings overridden; stopped after."""
    running = await app.start(
        Settings(
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            db=tmp_path / "dlrhub.db",
            shutdown_grace=1.0,
            **overrides,
        ),
        clock=clock or FakeClock(),
    )
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def server(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Running]:
    """The real server on a free port over a real SQLite file, with a grpc.aio stub."""
    async with serving(tmp_path, clock=clock) as running:
        address = f"127.0.0.1:{running.port}"
        channel = grpc.aio.insecure_channel(address)
        try:
            yield Running(running, DeliveryReportServiceStub(channel), channel, clock, address)
        finally:
            await channel.close(None)


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    address: str
    db: Path
    http_address: str = ""


def start_server_process(db: Path, *extra: str) -> ServerProcess:
    """`dlrhub serve` as a subprocess on a free port; waits for its "serving" log line."""
    command = [
        sys.executable,
        "-m",
        "dlrhub.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--db",
        str(db),
        *extra,
    ]
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # gRPC core or the interpreter may write plain lines too
        if entry.get("message") == "serving":
            return ServerProcess(process, f"127.0.0.1:{entry['port']}", db, f"127.0.0.1:{entry['http_port']}")
    process.kill()
    raise RuntimeError(f"dlrhub did not start: {''.join(seen)}{process.stderr.read()}")


@pytest.fixture
def server_process(db_path: Path) -> Iterator[ServerProcess]:
    """The real `dlrhub serve` process, stopped with SIGTERM afterwards."""
    running = start_server_process(db_path)
    try:
        yield running
    finally:
        running.process.terminate()
        try:
            running.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()


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
