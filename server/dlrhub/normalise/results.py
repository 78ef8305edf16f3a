"""What the normalisers produce: per-item results, rejections and payload errors."""

from __future__ import annotations

from dataclasses import dataclass

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an item (or a whole payload) is not a valid report."""

    # Path of the offending field from the top of the payload, e.g.
    # "results[3].messageId" or "[2].message_id"; "" for the whole payload.
    field: str
    # UPPER_SNAKE reason: INVALID_JSON, MISSING_FIELD, WRONG_TYPE,
    # INVALID_VALUE, UNKNOWN_FORMAT.
    reason: str
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


class PayloadError(Exception):
    """The payload as a whole is unusable (not JSON, or not a known shape)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.description)
        self.rejection = rejection
