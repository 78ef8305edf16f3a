"""A thin blocking wrapper: the AsyncClient on a private event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import (
    GetMessageResponse,
    IngestResponse,
    ListMessagesResponse,
    ListQuarantineResponse,
    QuarantinedItem,
    RenormaliseQuarantineResponse,
    StreamResponse,
)
from dlrhub_client.aio import DEFAULT_TARGET, AsyncClient

T = TypeVar("T")


class Client:
    """The same calls as AsyncClient, blocking; iterators become plain iterators.

    with Client("127.0.0.1:50051") as client:
        client.ingest(body)
        for report in client.iter_bulk("B1"):
            ...
    """

    def __init__(self, target: str = DEFAULT_TARGET, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dlrhub-client", daemon=True)
        self._thread.start()
        self._client: AsyncClient = self._run(self._make(target, options))

    @staticmethod
    async def _make(target: str, options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(target, **options)  # the aio channel must be made on its loop

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def ingest(self, payload: str | bytes, **options: Any) -> IngestResponse:
        return self._run(self._client.ingest(payload, **options))

    def ingest_gms(self, reports: Any, **options: Any) -> IngestResponse:
        return self._run(self._client.ingest_gms(reports, **options))

    def ingest_sent_sms_report(self, results: Any, **options: Any) -> IngestResponse:
        return self._run(self._client.ingest_sent_sms_report(results, **options))

    def get_message(self, message_id: str, **options: Any) -> GetMessageResponse:
        return self._run(self._client.get_message(message_id, **options))

    def list_messages(self, **options: Any) -> ListMessagesResponse:
        return self._run(self._client.list_messages(**options))

    def iter_bulk(self, bulk_id: str, **options: Any) -> Iterator[DeliveryReport]:
        return self._iterate(self._client.iter_bulk(bulk_id, **options))

    def iter_reference(self, reference: str, **options: Any) -> Iterator[DeliveryReport]:
        return self._iterate(self._client.iter_reference(reference, **options))

    def list_quarantine(self, **options: Any) -> ListQuarantineResponse:
        return self._run(self._client.list_quarantine(**options))

    def iter_quarantine(self, **options: Any) -> Iterator[QuarantinedItem]:
        return self._iterate(self._client.iter_quarantine(**options))

    def renormalise_quarantine(self, ids: Any = ()) -> RenormaliseQuarantineResponse:
        return self._run(self._client.renormalise_quarantine(ids))

    def stream(self, **options: Any) -> Iterator[StreamResponse]:
        return self._iterate(self._client.stream(**options))

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(_next(iterator))
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():
                self._run(_close(iterator))


async def _next(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


async def _close(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
