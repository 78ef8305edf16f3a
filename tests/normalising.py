"""What the normaliser tests share: one normaliser, one received time, fixtures and timestamps."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from dlrhub.normalise import Normaliser

FIXTURES = Path(__file__).parent / "fixtures"
RECEIVED = Timestamp(seconds=1_700_000_000, nanos=5_000_000)
NORMALISER = Normaliser.load()


def ts(text: str) -> Timestamp:
    """A Timestamp from RFC 3339 text."""
    stamp = Timestamp()
    stamp.FromJsonString(text)
    return stamp


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()
