"""Domain errors, and the one place that turns them into gRPC statuses.

    DlrhubError
    ├── InvalidArgument   INVALID_ARGUMENT, with field violations
    ├── NotFound          NOT_FOUND
    ├── OutOfRange        OUT_OF_RANGE
    ├── Unauthenticated   UNAUTHENTICATED (no token, or an unknown one)
    ├── PermissionDenied  PERMISSION_DENIED (the token's roles do not allow the call)
    ├── ResourceExhausted RESOURCE_EXHAUSTED (over a limit, named in the message)
    ├── Unavailable       UNAVAILABLE (the store cannot read or commit, or the server is stopping;
    │                     safe to retry)
    └── Internal          INTERNAL (a fault of the server's; the message names the request id it
                          was logged with, and nothing else)

Every status carries a google.rpc.Status with an ErrorInfo (a reason from
the contract's ErrorReason enum, so no other can be written; domain
"deliveryreport.dlrhub.io"; request details as metadata) and, for invalid
arguments, a BadRequest listing each field violation (AIP-193);
`invalid_argument` builds the usual one, naming a single field. The status
and its details are kept under MAX_DETAILS_BYTES, so that every client can
read them (gRPC clients refuse trailers over 8 KiB): the violations that do
not fit are left out, and the ErrorInfo metadata `violations_omitted` counts
them; a long message or metadata value is cut short.

The per-call interceptor (observability/calls.py) gives every call that raises its status here:
a DlrhubError its own, a store failure `store_unavailable()`, anything else `internal_error()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from deliveryreport.v1.error_reason_pb2 import ErrorReason

# The ErrorInfo domain (AIP-193): a DNS-style name of the service, documented in the contract.
DOMAIN = "deliveryreport.dlrhub.io"
# The encoded google.rpc.Status (the message and the details) stays within this, and the message
# and each metadata value within MAX_TEXT characters (they may quote a request's fields).
MAX_DETAILS_BYTES = 4096
MAX_TEXT = 500


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str
    reason: ErrorReason.ValueType = ErrorReason.INVALID_VALUE


class DlrhubError(Exception):
    """Base of every error a caller may see; `reason` is a value of the contract's ErrorReason."""

    code = code_pb2.INTERNAL

    def __init__(
        self,
        message: str,
        reason: ErrorReason.ValueType,
        *,
        violations: Sequence[FieldViolation] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.violations = list(violations)
        self.metadata = metadata or {}


class InvalidArgument(DlrhubError):
    code = code_pb2.INVALID_ARGUMENT


def invalid_argument(
    field: str,
    description: str,
    reason: ErrorReason.ValueType,
    *,
    message: str | None = None,
    violation_reason: ErrorReason.ValueType = ErrorReason.INVALID_VALUE,
    metadata: dict[str, str] | None = None,
) -> InvalidArgument:
    """INVALID_ARGUMENT naming one field: `reason`, and a field violation of `field` saying
    `description`. The message is `message`, or "<field> <description>"."""
    return InvalidArgument(
        f"{field} {description}" if message is None else message,
        reason,
        violations=[FieldViolation(field, description, violation_reason)],
        metadata=metadata,
    )


class NotFound(DlrhubError):
    code = code_pb2.NOT_FOUND


class OutOfRange(DlrhubError):
    code = code_pb2.OUT_OF_RANGE


class Unauthenticated(DlrhubError):
    code = code_pb2.UNAUTHENTICATED


class PermissionDenied(DlrhubError):
    code = code_pb2.PERMISSION_DENIED


class ResourceExhausted(DlrhubError):
    code = code_pb2.RESOURCE_EXHAUSTED


class Unavailable(DlrhubError):
    code = code_pb2.UNAVAILABLE


class Internal(DlrhubError):
    code = code_pb2.INTERNAL


def store_unavailable() -> Unavailable:
    """A store that cannot read or commit: the same words whatever the engine said (that is logged)."""
    return Unavailable(
        "the store cannot read or commit right now; retry later (an Ingest retried with the same"
        " request_id is stored once)",
        ErrorReason.STORE_UNAVAILABLE,
    )


def internal_error(request_id: str) -> Internal:
    """An unexpected fault: the caller learns only the request id the server logged it with."""
    return Internal(
        f"internal error; the server logged it with request id {request_id}",
        ErrorReason.INTERNAL,
        metadata={"request_id": request_id},
    )


def to_status(error: DlrhubError) -> grpc.Status:
    """The gRPC status, with details, for a domain error."""
    info = error_details_pb2.ErrorInfo(
        reason=ErrorReason.Name(error.reason),
        domain=DOMAIN,
        metadata={key: _clipped(value) for key, value in error.metadata.items()},
    )
    message = _clipped(error.message)
    bad_request = error_details_pb2.BadRequest()
    # 160: the framing and type URLs of the details (~100), and `violations_omitted` (~30).
    budget = MAX_DETAILS_BYTES - len(message.encode()) - info.ByteSize() - 160
    for number, violation in enumerate(error.violations):
        added = bad_request.field_violations.add(
            field=violation.field,
            description=violation.description,
            reason=ErrorReason.Name(violation.reason),
        )
        budget -= added.ByteSize() + 4  # its framing
        if budget < 0:
            del bad_request.field_violations[-1]
            info.metadata["violations_omitted"] = str(len(error.violations) - number)
            break
    details = [_pack(info)]
    if bad_request.field_violations:
        details.append(_pack(bad_request))
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=error.code, message=message, details=details)
    )
    return status


def _clipped(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
