"""Provider times to UTC protobuf Timestamps, checked against Timestamp's range."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise.fields import InvalidItem
from dlrhub.normalise.results import Rejection

# google.protobuf.Timestamp covers 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A description quotes at most this much of a value: an item's error never echoes the item.
_SHOWN = 40


def from_millis(millis: int, path: str) -> Timestamp:
    """Unix epoch milliseconds (GMS `time`)."""
    seconds, rest = divmod(millis, 1000)
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise InvalidItem(Rejection(path, ErrorReason.INVALID_VALUE, f"{path} is out of range: {millis}"))
    return Timestamp(seconds=seconds, nanos=rest * 1_000_000)


def from_text(text: str, path: str) -> Timestamp:
    """An ISO 8601 time with any offset (`2019-11-09T16:00:00.000+0000`, `-0300`, `Z`).

    A time without an offset is taken as UTC.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidItem(
            Rejection(
                path,
                ErrorReason.INVALID_VALUE,
                f"{path} is not a time like 2019-11-09T16:00:00.000+0000: {_shown(text)}",
            )
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:  # e.g. 9999-12-31T23:00:00-0300
        raise InvalidItem(Rejection(path, ErrorReason.INVALID_VALUE, f"{path} is out of range: {text!r}"))
    return Timestamp(seconds=seconds, nanos=delta.microseconds * 1000)


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")
