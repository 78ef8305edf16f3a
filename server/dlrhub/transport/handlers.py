"""The service's method handlers, registered as the generated code registers them, except that the
serialisers of Stream and StreamBatches also take bytes: a change is encoded once and the same
bytes go to every subscriber (feed/encoding.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf.message import Message

from deliveryreport.v1 import delivery_report_service_pb2 as service_pb2
from deliveryreport.v1 import delivery_report_service_pb2_grpc as service_grpc
from deliveryreport.v1.delivery_report_service_pb2 import StreamBatchesRequest, StreamRequest

if TYPE_CHECKING:
    from dlrhub.transport.service import DeliveryReportService

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["DeliveryReportService"].full_name


def add_to_server(service: DeliveryReportService, server: grpc.aio.Server) -> None:
    """Registers the service on `server`, its streams' serialisers taking bytes too."""
    captured = _CapturedHandlers()
    service_grpc.add_DeliveryReportServiceServicer_to_server(service, cast(grpc.aio.Server, captured))
    handlers = captured.handlers
    handlers["Stream"] = grpc.unary_stream_rpc_method_handler(
        service.Stream, request_deserializer=StreamRequest.FromString, response_serializer=_serialize
    )
    handlers["StreamBatches"] = grpc.unary_stream_rpc_method_handler(
        service.StreamBatches,
        request_deserializer=StreamBatchesRequest.FromString,
        response_serializer=_serialize,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]  # not in grpc-stubs


class _CapturedHandlers:
    """Stands in for the server while the generated code registers the method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, _: object) -> None:
        pass

    def add_registered_method_handlers(
        self, _: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = dict(handlers)


def _serialize(response: Message | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()
