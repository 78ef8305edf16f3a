"""Typed, path-aware reads of one provider item (a decoded JSON object).

Every read names the field's full path in its error, e.g.
`results[3].status.groupId`, so a caller can see exactly what to fix. JSON
null counts as absent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise.results import NormalisedItem, Rejection

_INTEGER_TEXT = re.compile(r"-?[0-9]{1,18}")
# A plain ASCII decimal: "0.0075", "-1", "1.5E-3" (Decimal() also takes "1_000" and non-ASCII digits).
_DECIMAL_TEXT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


class InvalidItem(Exception):
    """The item is not a valid report; carries the rejection."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.description)
        self.rejection = rejection


def read_item(
    index: int,
    value: object,
    text: str,
    path: str,
    format: int,
    build: Callable[[Fields], DeliveryReport],
    received: Timestamp,
) -> NormalisedItem:
    """One item of a payload: `build` reads it into a report (or raises InvalidItem), then the
    report gets its original text and the time it was received."""
    try:
        report = build(require_object(value, path))
    except InvalidItem as invalid:
        return NormalisedItem(index, text, rejection=invalid.rejection, format=format, path=path)
    report.received_time.CopyFrom(received)
    report.raw_payload = text
    return NormalisedItem(index, text, report=report, format=format, path=path)


def require_object(value: Any, path: str) -> Fields:
    """`value` as Fields, or InvalidItem if it is not a JSON object."""
    if not isinstance(value, dict):
        raise InvalidItem(
            Rejection(path, ErrorReason.WRONG_TYPE, f"{path or 'the payload'} must be a JSON object")
        )
    return Fields(value, path)


class Fields:
    """Reads fields of one JSON object, checking types."""

    __slots__ = ("data", "path")

    def __init__(self, data: dict[str, Any], path: str) -> None:
        self.data = data
        self.path = path

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def text(self, key: str) -> str | None:
        """A string; numbers are not accepted."""
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return self._checked(key, value)
        raise self._wrong(key, "a string")

    def required_text(self, key: str) -> str:
        """A string that must be there and not be empty (a message id: "" could not be fetched)."""
        value = self.text(key)
        if value is None:
            raise self._missing(key)
        if not value:
            path = self.path_of(key)
            raise InvalidItem(Rejection(path, ErrorReason.INVALID_VALUE, f"{path} must not be empty"))
        return value

    def address(self, key: str) -> str | None:
        """A phone number or address: a string, or a JSON integer (GMS `number`)."""
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return self._checked(key, value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return str(value)
        raise self._wrong(key, "a string or a non-negative integer")

    def integer(self, key: str, bits: int = 64) -> int | None:
        """A signed integer of `bits` bits (64, or 32 for codes and counts), given as a JSON integer
        or as a string of digits."""
        value = self.data.get(key)
        if value is None:
            return None
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
        if type(value) is int and low <= value < high:  # the common case, first
            return value
        if (isinstance(value, str) and _INTEGER_TEXT.fullmatch(value)) or (
            isinstance(value, Decimal) and value.is_finite() and value.adjusted() < 19 and value == int(value)
        ):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong(key, "an integer")
        if not low <= value < high:
            path = self.path_of(key)
            raise InvalidItem(Rejection(path, ErrorReason.INVALID_VALUE, f"{path} is out of range"))
        return value

    def required_integer(self, key: str) -> int:
        value = self.integer(key)
        if value is None:
            raise self._missing(key)
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self._wrong(key, "true or false")

    def decimal(self, key: str) -> str | None:
        """An exact decimal (a JSON number or a numeric string) as its text, e.g. "0.0075"."""
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool):
            raise self._wrong(key, "a number")
        if isinstance(value, int | Decimal):
            return str(value)
        if isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value.strip()):
            return value.strip()
        raise self._wrong(key, "a number")

    def object(self, key: str) -> Fields | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, dict):
            return Fields(value, self.path_of(key))
        raise self._wrong(key, "a JSON object")

    def _checked(self, key: str, value: str) -> str:
        """`value`, unless it holds an unpaired surrogate (JSON "\\ud800"): not UTF-8, so not storable."""
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                path = self.path_of(key)
                raise InvalidItem(
                    Rejection(path, ErrorReason.INVALID_VALUE, f"{path} contains an unpaired surrogate")
                ) from None
        return value

    def _missing(self, key: str) -> InvalidItem:
        path = self.path_of(key)
        return InvalidItem(Rejection(path, ErrorReason.MISSING_FIELD, f"{path} is required"))

    def path_of(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _wrong(self, key: str, expected: str) -> InvalidItem:
        path = self.path_of(key)
        got = type(self.data[key]).__name__
        kind = {"dict": "an object", "list": "an array", "Decimal": "a number", "int": "a number"}.get(
            got, f"a {got}"
        )
        return InvalidItem(Rejection(path, ErrorReason.WRONG_TYPE, f"{path} must be {expected}, not {kind}"))
