"""What the normalisers produce: per-item results, rejections and payload errors."""

from __future__ import annotations

from dataclasses import dataclass

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.error_reason_pb2 import ErrorReason


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an item (or a whole payload) is not a valid report."""

    # Path of the offending field from the top of the payload, e.g.
    # "results[3].messageId" or "[2].message_id"; "" for the whole payload.
    field: str
    # INVALID_JSON, INVALID_XML, UNKNOWN_FORMAT, WRONG_TYPE, MISSING_FIELD,
    # INVALID_VALUE or ITEM_TOO_LARGE (ErrorReason documents each).
    reason: ErrorReason.ValueType
    # Human-readable description.
    description: str


@dataclass(frozen=True, slots=True)
class NormalisedItem:
    """One item of a payload: a report, or the reason it was rejected."""

    # Zero-based position in the batch (0 for a single report).
    index: int
    # The item's original text.
    raw: str
    report: DeliveryReport | None = None
    rejection: Rejection | None = None
    # The format it was read as (a Format value), so a rejected item can be re-run.
    format: int = 0
    # Its path from the top of the payload, e.g. "results[3]"; "" for a payload of one report.
    path: str = ""


class PayloadError(Exception):
    """The payload as a whole is unusable (not JSON, or not a known shape)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.description)
        self.rejection = rejection
