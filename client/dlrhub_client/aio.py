"""The asyncio client."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from deliveryreport.v1 import delivery_report_service_pb2_grpc as service_grpc
from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import (
    DismissQuarantineRequest,
    DismissQuarantineResponse,
    Format,
    GetMessageRequest,
    GetMessageResponse,
    IngestRequest,
    IngestResponse,
    IngestResponseView,
    ListMessagesRequest,
    ListMessagesResponse,
    ListQuarantineRequest,
    ListQuarantineResponse,
    PruneMessagesRequest,
    PruneMessagesResponse,
    QuarantinedItem,
    RenormaliseQuarantineRequest,
    RenormaliseQuarantineResponse,
    StreamBatchesRequest,
    StreamRequest,
    StreamResponse,
)
from deliveryreport.v1.provider_formats_pb2 import GmsReport, GmsReports, SentSmsReport, SentSmsReports
from dlrhub_client import payloads
from dlrhub_client.errors import UnavailableError, from_rpc_error

if TYPE_CHECKING:
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

T = TypeVar("T")
M = TypeVar("M", bound=Message)
DEFAULT_TARGET = "127.0.0.1:50051"
BASIC = IngestResponseView.INGEST_RESPONSE_VIEW_BASIC


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for the channel: the CA to trust, and for mutual TLS the client's certificate and key."""

    root_certificates: Path | None = None
    certificate_chain: Path | None = None
    private_key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            read(self.root_certificates), read(self.private_key), read(self.certificate_chain)
        )


class AsyncClient:
    """dlrhub over grpc.aio. Errors are dlrhub_client.errors classes, never raw grpc errors.

    async with AsyncClient("127.0.0.1:50051") as client:
        await client.ingest(body)
        async for change in client.stream(bulk_id="B1"):
            ...
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TlsConfig | None = None,
        timeout: float | None = 30.0,
        channel: grpc.aio.Channel | None = None,
        reconnect_attempts: int = 10,
        reconnect_backoff: float = 0.5,
        reconnect_backoff_max: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, tls.credentials())
                if tls is not None
                else grpc.aio.insecure_channel(target)
            )
        self._channel = channel
        self._stub: DeliveryReportServiceAsyncStub = service_grpc.DeliveryReportServiceStub(channel)
        self._health_check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._reconnect_attempts = reconnect_attempts
        self._reconnect_backoff = reconnect_backoff
        self._reconnect_backoff_max = reconnect_backoff_max
        self._sleep = sleep

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    # Ingest.

    async def ingest(
        self,
        payload: str | bytes,
        *,
        format: Format.ValueType = Format.FORMAT_UNSPECIFIED,
        request_id: str = "",
        view: IngestResponseView.ValueType = BASIC,
    ) -> IngestResponse:
        """Ingests a provider body verbatim; the format is detected unless given. The answer has each
        item's outcome; `view=IngestResponseView.INGEST_RESPONSE_VIEW_FULL` adds the reports."""
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        return await self._ingest(
            IngestRequest(payload=text, format=format, request_id=request_id, view=view)
        )

    async def ingest_gms(
        self,
        reports: Iterable[GmsReport] | Iterable[Mapping[str, Any]],
        *,
        request_id: str = "",
        view: IngestResponseView.ValueType = BASIC,
    ) -> IngestResponse:
        """Ingests GMS reports: typed messages, or dicts exactly as the provider sends them."""
        items = list(reports)
        if all(isinstance(report, GmsReport) for report in items):
            batch = GmsReports(reports=items)  # type: ignore[arg-type]  # all GmsReport, checked above
            return await self._ingest(IngestRequest(gms=batch, request_id=request_id, view=view))
        payload = payloads.batch(Format.FORMAT_GMS, _provider_json(items))
        return await self.ingest(payload, format=Format.FORMAT_GMS, request_id=request_id, view=view)

    async def ingest_sent_sms_report(
        self,
        results: Iterable[SentSmsReport] | Iterable[Mapping[str, Any]],
        *,
        request_id: str = "",
        view: IngestResponseView.ValueType = BASIC,
    ) -> IngestResponse:
        """Ingests SentSMSReport reports: typed messages, or dicts exactly as the provider sends them."""
        items = list(results)
        if all(isinstance(report, SentSmsReport) for report in items):
            batch = SentSmsReports(results=items)  # type: ignore[arg-type]  # all SentSmsReport, checked above
            return await self._ingest(IngestRequest(sent_sms_report=batch, request_id=request_id, view=view))
        payload = payloads.batch(Format.FORMAT_SENT_SMS_REPORT, _provider_json(items))
        return await self.ingest(
            payload, format=Format.FORMAT_SENT_SMS_REPORT, request_id=request_id, view=view
        )

    # Messages.

    async def get_message(
        self,
        message_id: str,
        *,
        source: Source.ValueType = Source.SOURCE_UNSPECIFIED,
        include_history: bool = False,
    ) -> GetMessageResponse:
        """The current state of a message (one per source that knows the id), and its history if asked.
        Raises NotFoundError when no message has the id."""
        request = GetMessageRequest(message_id=message_id, source=source, include_history=include_history)
        return await self._unary(
            self._stub.GetMessage(request, timeout=self._timeout, metadata=self._metadata)
        )

    async def list_messages(
        self,
        *,
        bulk_id: str | None = None,
        reference: str | None = None,
        source: Source.ValueType = Source.SOURCE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> ListMessagesResponse:
        """One page of the messages of a bulk, or with a reference; give exactly one of the two."""
        request = ListMessagesRequest(source=source, page_size=page_size, page_token=page_token)
        if bulk_id is not None and reference is None:
            request.bulk_id = bulk_id
        elif reference is not None and bulk_id is None:
            request.reference = reference
        else:
            raise ValueError("give exactly one of bulk_id or reference")
        return await self._unary(
            self._stub.ListMessages(request, timeout=self._timeout, metadata=self._metadata)
        )

    async def iter_bulk(
        self, bulk_id: str, *, source: Source.ValueType = Source.SOURCE_UNSPECIFIED, page_size: int = 500
    ) -> AsyncIterator[DeliveryReport]:
        """Every message of a bulk, following page tokens."""
        async for report in self._pages(bulk_id=bulk_id, source=source, page_size=page_size):
            yield report

    async def iter_reference(
        self, reference: str, *, source: Source.ValueType = Source.SOURCE_UNSPECIFIED, page_size: int = 500
    ) -> AsyncIterator[DeliveryReport]:
        """Every message with this sender reference, following page tokens."""
        async for report in self._pages(reference=reference, source=source, page_size=page_size):
            yield report

    # Quarantine.

    async def list_quarantine(
        self, *, include_resolved: bool = False, page_size: int = 0, page_token: str = ""
    ) -> ListQuarantineResponse:
        """One page of quarantined (rejected) items, oldest first."""
        request = ListQuarantineRequest(
            include_resolved=include_resolved, page_size=page_size, page_token=page_token
        )
        return await self._unary(
            self._stub.ListQuarantine(request, timeout=self._timeout, metadata=self._metadata)
        )

    async def iter_quarantine(self, *, include_resolved: bool = False) -> AsyncIterator[QuarantinedItem]:
        """Every quarantined item, following page tokens."""
        token = ""
        while True:
            page = await self.list_quarantine(
                include_resolved=include_resolved, page_size=500, page_token=token
            )
            for item in page.items:
                yield item
            token = page.next_page_token
            if not token:
                return

    async def renormalise_quarantine(self, ids: Iterable[int] = ()) -> RenormaliseQuarantineResponse:
        """Runs quarantined items (all open ones, by default) through the current normaliser again."""
        request = RenormaliseQuarantineRequest(ids=list(ids))
        return await self._unary(
            self._stub.RenormaliseQuarantine(request, timeout=self._timeout, metadata=self._metadata)
        )

    async def dismiss_quarantine(
        self, ids: Iterable[int] = (), *, received_before: datetime | None = None
    ) -> DismissQuarantineResponse:
        """Dismisses quarantined items: those with these ids, or every open one last received before
        `received_before` (an aware datetime). They no longer count as open. Needs the admin role."""
        request = DismissQuarantineRequest(ids=list(ids))
        if received_before is not None:
            request.received_before.FromDatetime(received_before)
        return await self._unary(
            self._stub.DismissQuarantine(request, timeout=self._timeout, metadata=self._metadata)
        )

    # Retention.

    async def prune_messages(self, older_than: timedelta | None = None) -> PruneMessagesResponse:
        """Prunes, now, the final messages (with their history) and closed quarantined items that
        last changed longer ago than `older_than` (None: the server's DLRHUB_RETENTION). Needs the
        admin role."""
        request = PruneMessagesRequest()
        if older_than is not None:
            request.older_than.FromTimedelta(older_than)
        return await self._unary(
            self._stub.PruneMessages(request, timeout=self._timeout, metadata=self._metadata)
        )

    # Health.

    async def check_health(self, service: str = "") -> HealthCheckResponse.ServingStatus.ValueType:
        """The server's health (grpc.health.v1), or that of one of its services: SERVING or
        NOT_SERVING (HealthCheckResponse.ServingStatus). Raises UnavailableError when it does not
        answer, NotFoundError for a service it does not know. Open to callers without a token."""
        response: HealthCheckResponse = await self._unary(
            self._health_check(HealthCheckRequest(service=service), timeout=self._timeout)
        )
        return response.status

    # Stream.

    async def stream(
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
    ) -> AsyncIterator[StreamResponse]:
        """Changes as they are stored, resuming after `cursor` (or from the beginning, or from now).
        Each is a StreamResponse with its `cursor` and its `change` (the report and the message's
        state); with `include_heartbeats`, the heartbeats too (`response.HasField("heartbeat")`).

        On UNAVAILABLE, or when the server ends the stream (a restart), it reconnects with backoff
        and resumes after the last cursor it saw, so every change arrives once and in order.
        Gives up with UnavailableError after `reconnect_attempts` failed connections in a row.
        """
        request = StreamRequest(
            bulk_id=bulk_id,
            message_ids=list(message_ids),
            statuses=list(statuses),
            channels=list(channels),
            source=source,
        )
        if heartbeat_interval is not None:
            request.heartbeat_interval.FromTimedelta(heartbeat_interval)
        last = cursor
        failures = 0
        # StreamBatches: the same feed as Stream, several changes per message when they are ready;
        # Stream for a server from before StreamBatches.
        batched = True
        while True:
            attempt = StreamRequest()
            attempt.CopyFrom(request)
            if last is not None:
                attempt.cursor = last
            elif from_beginning:
                attempt.from_beginning = True
            call: grpc.aio.UnaryStreamCall[Any, Any] = (
                self._stub.StreamBatches(StreamBatchesRequest(stream=attempt), metadata=self._metadata)
                if batched
                else self._stub.Stream(attempt, metadata=self._metadata)
            )
            try:
                async for message in call:
                    failures = 0
                    for response in message.responses if batched else (message,):
                        last = response.cursor
                        if include_heartbeats or not response.HasField("heartbeat"):
                            yield response
            except grpc.aio.AioRpcError as error:
                if batched and error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    batched = False
                    continue
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()
            failures += 1
            if failures > self._reconnect_attempts:
                raise UnavailableError(
                    f"stream lost and {self._reconnect_attempts} reconnections failed",
                    code=grpc.StatusCode.UNAVAILABLE,
                )
            ceiling = min(self._reconnect_backoff_max, self._reconnect_backoff * 2 ** (failures - 1))
            await self._sleep(ceiling / 2 + random.random() * ceiling / 2)  # noqa: S311 - jitter, not security

    # Plumbing.

    async def _ingest(self, request: IngestRequest) -> IngestResponse:
        return await self._unary(self._stub.Ingest(request, timeout=self._timeout, metadata=self._metadata))

    async def _unary(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def _pages(self, **selector: Any) -> AsyncIterator[DeliveryReport]:
        token = ""
        while True:
            page = await self.list_messages(page_token=token, **selector)
            for report in page.messages:
                yield report
            token = page.next_page_token
            if not token:
                return


def _provider_json(items: list[Any]) -> list[str]:
    """Dicts in the provider's own JSON (numbers stay numbers); mixing in typed messages is an error."""
    if not all(isinstance(item, Mapping) for item in items):
        raise TypeError("give either typed messages or dicts, not a mix")
    return [json.dumps(dict(item), default=str) for item in items]
