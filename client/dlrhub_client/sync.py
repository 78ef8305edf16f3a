"""A thin blocking wrapper: the AsyncClient on a private event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

from grpc_health.v1.health_pb2 import HealthCheckResponse

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import (
    DismissQuarantineResponse,
    Format,
    GetMessageResponse,
    IngestResponse,
    IngestResponseView,
    ListMessagesResponse,
    ListQuarantineResponse,
    PruneMessagesResponse,
    QuarantinedItem,
    RenormaliseQuarantineResponse,
    StreamResponse,
)
from deliveryreport.v1.provider_formats_pb2 import GmsReport, SentSmsReport
from dlrhub_client.aio import BASIC, DEFAULT_TARGET, AsyncClient, TlsConfig

T = TypeVar("T")


class Client:
    """The same calls as AsyncClient, blocking, with the same parameters; iterators become plain
    iterators. (It makes its own channel, on its loop: a grpc.aio channel belongs to one event loop.)

    with Client("127.0.0.1:50051") as client:
        client.ingest(body)
        for report in client.iter_bulk("B1"):
            ...
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TlsConfig | None = None,
        timeout: float | None = 30.0,
        reconnect_attempts: int = 10,
        reconnect_backoff: float = 0.5,
        reconnect_backoff_max: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dlrhub-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:  # the aio channel must be made on its loop
            return AsyncClient(
                target,
                token=token,
                tls=tls,
                timeout=timeout,
                reconnect_attempts=reconnect_attempts,
                reconnect_backoff=reconnect_backoff,
                reconnect_backoff_max=reconnect_backoff_max,
                sleep=sleep,
            )

        self._client = self._run(make())

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

    def ingest(
        self,
        payload: str | bytes,
        *,
        format: Format.ValueType = Format.FORMAT_UNSPECIFIED,
        request_id: str = "",
        view: IngestResponseView.ValueType = BASIC,
    ) -> IngestResponse:
        return self._run(self._client.ingest(payload, format=format, request_id=request_id, view=view))

    def ingest_gms(
        self,
        reports: Iterable[GmsReport] | Iterable[Mapping[str, Any]],
        *,
        request_id: str = "",
        view: IngestResponseView.ValueType = BASIC,
    ) -> IngestResponse:
        return self._run(self._client.ingest_gms(reports, request_id=request_id, view=view))

    def ingest_sent_sms_report(
        self,
        results: Iterable[SentSmsReport] | Iterable[Mapping[str, Any]],
        *,
        request_id: str = "",
        view: IngestResponseView.ValueType = BASIC,
    ) -> IngestResponse:
        return self._run(self._client.ingest_sent_sms_report(results, request_id=request_id, view=view))

    def get_message(
        self,
        message_id: str,
        *,
        source: Source.ValueType = Source.SOURCE_UNSPECIFIED,
        include_history: bool = False,
    ) -> GetMessageResponse:
        return self._run(self._client.get_message(message_id, source=source, include_history=include_history))

    def list_messages(
        self,
        *,
        bulk_id: str | None = None,
        reference: str | None = None,
        source: Source.ValueType = Source.SOURCE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> ListMessagesResponse:
        return self._run(
            self._client.list_messages(
                bulk_id=bulk_id,
                reference=reference,
                source=source,
                page_size=page_size,
                page_token=page_token,
            )
        )

    def iter_bulk(
        self, bulk_id: str, *, source: Source.ValueType = Source.SOURCE_UNSPECIFIED, page_size: int = 500
    ) -> Iterator[DeliveryReport]:
        return self._iterate(self._client.iter_bulk(bulk_id, source=source, page_size=page_size))

    def iter_reference(
        self, reference: str, *, source: Source.ValueType = Source.SOURCE_UNSPECIFIED, page_size: int = 500
    ) -> Iterator[DeliveryReport]:
        return self._iterate(self._client.iter_reference(reference, source=source, page_size=page_size))

    def list_quarantine(
        self, *, include_resolved: bool = False, page_size: int = 0, page_token: str = ""
    ) -> ListQuarantineResponse:
        return self._run(
            self._client.list_quarantine(
                include_resolved=include_resolved, page_size=page_size, page_token=page_token
            )
        )

    def iter_quarantine(self, *, include_resolved: bool = False) -> Iterator[QuarantinedItem]:
        return self._iterate(self._client.iter_quarantine(include_resolved=include_resolved))

    def renormalise_quarantine(self, ids: Iterable[int] = ()) -> RenormaliseQuarantineResponse:
        return self._run(self._client.renormalise_quarantine(ids))

    def dismiss_quarantine(
        self, ids: Iterable[int] = (), *, received_before: datetime | None = None
    ) -> DismissQuarantineResponse:
        return self._run(self._client.dismiss_quarantine(ids, received_before=received_before))

    def prune_messages(self, older_than: timedelta | None = None) -> PruneMessagesResponse:
        return self._run(self._client.prune_messages(older_than))

    def check_health(self, service: str = "") -> HealthCheckResponse.ServingStatus.ValueType:
        return self._run(self._client.check_health(service))

    def stream(
        self,
        *,
        bulk_id: str = "",
        message_ids: Iterable[str] = (),
        statuses: Iterable[DeliveryStatus.ValueType] = (),
        channels: Iterable[Channel.ValueType] = (),
        source: Source.ValueType = Source.SOURCE_UNSPECIFIED,
        cursor: str | None = None,
        from_beginning: bool = False,
        heartbeat_interval: timedelta | None = None,
        include_heartbeats: bool = False,
    ) -> Iterator[StreamResponse]:
        return self._iterate(
            self._client.stream(
                bulk_id=bulk_id,
                message_ids=message_ids,
                statuses=statuses,
                channels=channels,
                source=source,
                cursor=cursor,
                from_beginning=from_beginning,
                heartbeat_interval=heartbeat_interval,
                include_heartbeats=include_heartbeats,
            )
        )

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
