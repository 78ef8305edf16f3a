"""A change's StreamResponse bytes, encoded once for every subscriber that sends it.

The bytes are framed here from the report and state's own encodings, as protobuf frames a message
field (a tag, the length, the bytes), so nothing is copied into a StreamResponse first:

    StreamResponse         cursor | change: a StreamChange
    StreamChange           report | state
    StreamBatchesResponse  responses (repeated): each a StreamResponse

A batch is the concatenation of its changes' framed bytes, so batches cost no more encoding than
single changes. The servicer yields these bytes as they are (transport/handlers.py registers
serialisers that pass bytes through). tests/test_stream.py parses them with the generated code.

The hub encodes each live change once as it is published (its size is what the hub's budget counts);
a change read from the store while catching up is encoded by the subscriber that reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from google.protobuf.descriptor import Descriptor

from deliveryreport.v1.delivery_report_service_pb2 import StreamBatchesResponse, StreamChange, StreamResponse
from dlrhub.store.base import PLAIN_CURSORS, Change, CursorFormat

# A StreamBatchesResponse holds changes up to about this many bytes (clients accept 4 MiB by default).
MAX_BATCH_BYTES = 1 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(message: Descriptor, field: str) -> bytes:
    """The tag of a length-delimited field (a string or a message)."""
    return _varint(message.fields_by_name[field].number << 3 | 2)


_CURSOR = _tag(StreamResponse.DESCRIPTOR, "cursor")
_CHANGE = _tag(StreamResponse.DESCRIPTOR, "change")
_REPORT = _tag(StreamChange.DESCRIPTOR, "report")
_STATE = _tag(StreamChange.DESCRIPTOR, "state")
_RESPONSES = _tag(StreamBatchesResponse.DESCRIPTOR, "responses")


def _field(tag: bytes, data: bytes) -> bytes:
    return tag + _varint(len(data)) + data


class EncodedChange:
    """A change with its StreamResponse bytes (`response`) and the few bytes (`framing`) that make
    them an item of a StreamBatchesResponse."""

    __slots__ = ("change", "framing", "response")

    def __init__(self, change: Change, cursors: CursorFormat = PLAIN_CURSORS) -> None:
        """`cursors`: how the store that holds the change writes its cursor."""
        self.change = change
        body = _field(_REPORT, change.report.SerializeToString()) + _field(
            _STATE, change.state.SerializeToString()
        )
        self.response = _field(_CURSOR, cursors.format(change.cursor).encode()) + _field(_CHANGE, body)
        self.framing = _RESPONSES + _varint(len(self.response))

    @property
    def cursor(self) -> int:
        return self.change.cursor

    @property
    def size(self) -> int:
        """Its bytes as an item of a StreamBatchesResponse."""
        return len(self.framing) + len(self.response)


def batches(changes: Sequence[EncodedChange], max_bytes: int = MAX_BATCH_BYTES) -> Iterator[bytes]:
    """The changes as StreamBatchesResponses of up to `max_bytes` each (or one bigger change)."""
    parts: list[bytes] = []
    size = 0
    for change in changes:
        if parts and size + change.size > max_bytes:
            yield b"".join(parts)
            parts, size = [], 0
        parts += (change.framing, change.response)
        size += change.size
    if parts:
        yield b"".join(parts)
