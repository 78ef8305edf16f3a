"""Every store call runs on a worker thread, never on the event loop (store/base.py; #19.3: the history
read, a full table scan then, ran on the loop and stalled every call).

The real app runs over the real SQLite store, which records the thread of each call it gets.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageRequest,
    IngestRequest,
    ListMessagesRequest,
    ListQuarantineRequest,
    RenormaliseQuarantineRequest,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.store import SqliteStore
from tests.conftest import FakeClock

TIMEOUT = 10.0
# Store (base.py) methods.
CALLS = (
    "transaction",
    "messages",
    "history",
    "messages_by",
    "changes",
    "latest_cursor",
    "quarantined",
    "open_quarantine_count",
    "close",
)


class RecordingStore(SqliteStore):
    """The SQLite store, noting which thread each call of the Store interface came from."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: dict[str, set[int]] = {name: set() for name in CALLS}
        for name in CALLS:
            setattr(self, name, self._recorded(name, getattr(self, name)))

    def _recorded(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.threads[name].add(threading.get_ident())
            return call(*args, **kwargs)

        return recorded


async def test_no_store_call_runs_on_the_event_loop(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    store = RecordingStore(tmp_path / "dlrhub.db")
    running = await app.start(
        Settings(
            listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "dlrhub.db", shutdown_grace=1.0
        ),
        store=store,
        clock=FakeClock(),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = DeliveryReportServiceStub(channel)
            batch = (
                '[{"message_id": "t-1", "status": 2, "time": 1477417294667, "extra_id": "R"}, {"status": 2}]'
            )
            await stub.Ingest(IngestRequest(payload=batch, request_id="threads"), timeout=TIMEOUT)
            fetched = await stub.GetMessage(
                GetMessageRequest(message_id="t-1", include_history=True), timeout=TIMEOUT
            )
            assert len(fetched.history) == 1
            await stub.ListMessages(ListMessagesRequest(reference="R"), timeout=TIMEOUT)
            await stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT)
            await stub.RenormaliseQuarantine(RenormaliseQuarantineRequest(), timeout=TIMEOUT)
            stream = stub.Stream(StreamRequest(from_beginning=True))
            while True:  # the opening heartbeat, then the stored change (read from the store)
                message = await asyncio.wait_for(stream.read(), TIMEOUT)
                assert isinstance(message, StreamResponse)
                if message.HasField("change"):
                    break
            stream.cancel()
    finally:
        await running.stop()

    called = {name for name, threads in store.threads.items() if threads}
    assert called == set(CALLS)  # the flows above use the whole interface
    on_the_loop = sorted(name for name, threads in store.threads.items() if loop_thread in threads)
    assert on_the_loop == []
