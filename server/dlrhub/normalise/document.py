"""Strict JSON decoding that keeps each batch item's original text (dlrhub_client.payloads), with
its errors as the normalisers' PayloadError."""

from __future__ import annotations

from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise.results import PayloadError, Rejection
from dlrhub_client import payloads
from dlrhub_client.payloads import Document, TooManyItems

__all__ = ["Document", "TooManyItems", "decode"]


def decode(text: str, max_items: int | None = None) -> Document:
    """Decode `text`; raises PayloadError (reason INVALID_JSON) if it is not JSON, TooManyItems (as
    soon as it finds one too many) if a batch in it holds more than `max_items` items."""
    try:
        return payloads.decode(text, max_items=max_items)
    except payloads.InvalidJson as error:
        raise PayloadError(Rejection("", ErrorReason.INVALID_JSON, f"invalid JSON: {error}")) from None
