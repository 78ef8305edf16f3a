"""The service's method handlers, registered as the generated code registers them, except that:

- the serialisers of Stream and StreamBatches also take bytes: a change is encoded once and the same
  bytes go to every subscriber (feed/encoding.py);
- Ingest's request deserialiser refuses typed reports over the item limit before parsing them:
  parsed, each typed report takes ~200 bytes of memory however few it has on the wire (an empty
  one, 2), so the 16 MiB a request may carry would take ~1.8 GB. It counts them from the encoding,
  reading at most one report over the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf.message import Message

from deliveryreport.v1 import delivery_report_service_pb2 as service_pb2
from deliveryreport.v1 import delivery_report_service_pb2_grpc as service_grpc
from deliveryreport.v1.delivery_report_service_pb2 import IngestRequest, StreamBatchesRequest, StreamRequest
from dlrhub.transport.service import too_many_items
from dlrhub.write.writer import TooManyItems

if TYPE_CHECKING:
    from dlrhub.transport.service import DeliveryReportService

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["DeliveryReportService"].full_name
# IngestRequest's typed bodies, by field number; in each, the reports are field 1.
_TYPED_BODIES = {
    field.number: field.name
    for field in IngestRequest.DESCRIPTOR.oneofs_by_name["body"].fields
    if field.message_type is not None
}
_LENGTH_DELIMITED = 2


def add_to_server(service: DeliveryReportService, server: grpc.aio.Server, *, max_items: int) -> None:
    """Registers the service on `server`, its streams' serialisers taking bytes too, and Ingest
    refusing more than `max_items` typed reports before parsing them."""
    captured = _CapturedHandlers()
    service_grpc.add_DeliveryReportServiceServicer_to_server(service, cast(grpc.aio.Server, captured))
    handlers = captured.handlers
    handlers["Ingest"] = grpc.unary_unary_rpc_method_handler(
        service.Ingest,
        request_deserializer=_ingest_request(max_items),
        response_serializer=service_pb2.IngestResponse.SerializeToString,
    )
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


def _ingest_request(max_items: int) -> Callable[[bytes], IngestRequest]:
    def deserialize(data: bytes) -> IngestRequest:
        over = _typed_body_over(data, max_items)
        if over is not None:
            raise too_many_items(over, TooManyItems(max_items))
        return IngestRequest.FromString(data)

    return deserialize


def _typed_body_over(data: bytes, limit: int) -> str | None:
    """The name of the typed body holding more than `limit` reports in an encoded IngestRequest, if
    one does: its top-level fields are walked, and at most `limit` + 1 reports."""
    if len(data) <= 2 * limit:  # a report takes two bytes at least
        return None
    counts: dict[str, int] = {}
    try:
        for number, start, end in _length_delimited(data, 0, len(data)):
            name = _TYPED_BODIES.get(number)
            if name is None:
                continue
            for report, _, _ in _length_delimited(data, start, end):
                if report == 1:
                    counts[name] = counts.get(name, 0) + 1
                    if counts[name] > limit:
                        return name
    except IndexError:  # not a valid encoding: the parser says so
        pass
    return None


def _length_delimited(data: bytes, position: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message encoded in
    data[position:end]; the other fields are skipped, and an unknown wire type ends the walk."""
    while position < end:
        key, position = _varint(data, position)
        wire_type = key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, position = _varint(data, position)
            yield key >> 3, position, position + length
            position += length
        elif wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type in (1, 5):  # 64 and 32 bits
            position += 8 if wire_type == 1 else 4
        else:
            return


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
