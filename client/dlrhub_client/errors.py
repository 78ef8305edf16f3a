"""The client's exceptions: one class per status code a caller may act on.

    DlrhubClientError
    ├── InvalidArgumentError     the request (or every item in it) was invalid
    ├── NotFoundError            no message with that id
    ├── OutOfRangeError          a stream cursor ahead of the store
    ├── UnauthenticatedError     no token, or an unknown one
    ├── PermissionDeniedError    the token may not do this
    ├── ResourceExhaustedError   over a limit (request size, streams)
    ├── UnavailableError         the server or its store is unavailable; safe to retry
    ├── DeadlineExceededError    the call took longer than its timeout
    └── (DlrhubClientError)      anything else

Each carries the gRPC code, the server's UPPER_SNAKE `reason`, its metadata and
the field violations. Callers catch DlrhubClientError; no raw grpc error leaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str
    reason: str = ""


class DlrhubClientError(Exception):
    """A call to dlrhub failed."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata = metadata or {}
        self.violations = violations or []

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        for violation in self.violations:
            text += f"\n  {violation.field or '(payload)'}: {violation.description}"
        return text


class InvalidArgumentError(DlrhubClientError):
    pass


class NotFoundError(DlrhubClientError):
    pass


class OutOfRangeError(DlrhubClientError):
    pass


class UnauthenticatedError(DlrhubClientError):
    pass


class PermissionDeniedError(DlrhubClientError):
    pass


class ResourceExhaustedError(DlrhubClientError):
    pass


class UnavailableError(DlrhubClientError):
    pass


class DeadlineExceededError(DlrhubClientError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[DlrhubClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> DlrhubClientError:
    """The client exception for a failed call, with the server's details decoded."""
    code = error.code()
    message = error.details() or code.name
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    trailing: Any = error.trailing_metadata() or ()
    for key, value in trailing:
        if key != _STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations = [
                    FieldViolation(v.field, v.description, v.reason) for v in bad_request.field_violations
                ]
    kind = _BY_CODE.get(code, DlrhubClientError)
    return kind(message, code=code, reason=reason, metadata=metadata, violations=violations)
