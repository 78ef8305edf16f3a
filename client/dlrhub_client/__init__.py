"""Python client for dlrhub, the delivery-report hub.

    from dlrhub_client import AsyncClient, Client

Errors are the classes in dlrhub_client.errors (catch DlrhubClientError).
"""

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestOutcome, IngestResponseView
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub_client.aio import DEFAULT_TARGET, AsyncClient, TlsConfig
from dlrhub_client.errors import (
    DeadlineExceededError,
    DlrhubClientError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from dlrhub_client.sync import Client

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "Channel",
    "Client",
    "DeadlineExceededError",
    "DeliveryReport",
    "DeliveryStatus",
    "DlrhubClientError",
    "ErrorReason",
    "FieldViolation",
    "Format",
    "IngestOutcome",
    "IngestResponseView",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Source",
    "TlsConfig",
    "UnauthenticatedError",
    "UnavailableError",
]
