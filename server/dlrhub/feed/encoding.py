"""Each change's StreamResponse bytes, encoded once for every subscriber that sends it.

The bytes are framed here from the report and state's own encodings, as protobuf frames a message
field (a tag, the length, the bytes), so nothing is copied into a StreamResponse first:

    StreamResponse         cursor | change: a StreamChange
    StreamChange           report | state
    StreamBatchesResponse  responses (repeated): each a StreamResponse

A batch is the concatenation of its changes' framed bytes, so batches cost no more encoding than
single changes. The servicer yields these bytes as they are (transport/handlers.py registers
serialisers that pass bytes through). tests/test_stream.py parses them with the generated code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor

from deliveryreport.v1.delivery_report_service_pb2 import StreamBatchesResponse, StreamChange, StreamResponse
from dlrhub.store.base import Change

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


def _response(change: Change) -> bytes:
    """The StreamResponse of a change."""
    body = _field(_REPORT, change.report.SerializeToString()) + _field(
        _STATE, change.state.SerializeToString()
    )
    return _field(_CURSOR, str(change.cursor).encode()) + _field(_CHANGE, body)


class _Encoded:
    """One change's StreamResponse, and the same framed as an item of a StreamBatchesResponse."""

    __slots__ = ("framed", "plain")

    def __init__(self, plain: bytes) -> None:
        self.plain = plain
        self.framed: bytes | None = None  # made when a StreamBatches subscriber first sends it


class StreamEncoder:
    """Each change's StreamResponse, encoded once however many subscribers send it.

    Cursors are never reused, so a cursor names one encoding; the newest `size` are kept (as many as
    a subscriber buffers: live subscribers send a change within that window).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        # OrderedDict, not dict: popping the oldest of a dict scans the holes its deletions left.
        self._encoded: OrderedDict[int, _Encoded] = OrderedDict()

    def _entry(self, change: Change) -> _Encoded:
        entry = self._encoded.get(change.cursor)
        if entry is None:
            entry = self._encoded[change.cursor] = _Encoded(_response(change))
            if len(self._encoded) > self._size:
                self._encoded.popitem(last=False)
        return entry

    def response(self, change: Change) -> bytes:
        """The change as a StreamResponse."""
        return self._entry(change).plain

    def _framed(self, change: Change) -> bytes:
        entry = self._entry(change)
        if entry.framed is None:
            entry.framed = _field(_RESPONSES, entry.plain)
        return entry.framed

    def batches(self, changes: list[Change], max_bytes: int = MAX_BATCH_BYTES) -> Iterator[bytes]:
        """The changes as StreamBatchesResponses of up to `max_bytes` each (or one bigger change)."""
        parts: list[bytes] = []
        size = 0
        for change in changes:
            framed = self._framed(change)
            if parts and size + len(framed) > max_bytes:
                yield b"".join(parts)
                parts, size = [], 0
            parts.append(framed)
            size += len(framed)
        if parts:
            yield b"".join(parts)
