"""Strict JSON decoding that keeps each batch item's original text (dlrhub_client.payloads), with
its errors as the normalisers' PayloadError."""

from __future__ import annotations

from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise.results import PayloadError, Rejection
from dlrhub_client import payloads
from dlrhub_client.payloads import Document

__all__ = ["Document", "decode"]


def decode(text: str) -> Document:
    """Decode `text`; raises PayloadError (reason INVALID_JSON) if it is not JSON."""
    try:
        return payloads.decode(text)
    except payloads.InvalidJson as error:
        raise PayloadError(Rejection("", ErrorReason.INVALID_JSON, f"invalid JSON: {error}")) from None
