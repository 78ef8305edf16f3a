"""MessageState to and from bytes, for any store engine.

The merge bookkeeping (the winner's key and the field suppliers' keys) is
packed binary, written on every accepted report. Its size is bounded by the
number of descriptive fields, whatever the length of the message's history:

    version 2 (byte) | key count (u32) | supplier count (u32)
    key count x      rank (i16) | event seconds (i64) | nanos (u32) | digest (16 bytes)
    supplier count x DeliveryReport field number (u32) | index into the keys (u32)

The first key is the winner's; the others are the suppliers' keys that are
not the winner's. Fields are named by their protobuf field numbers, which
never change. Earlier releases kept every key seen (version 1, and JSON before
it), in an order that depended on arrival; the SQLite migration to schema 4
rebuilds those rows from the history, so this release reads version 2 only.
"""

from __future__ import annotations

import struct

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from dlrhub.merge import DESCRIPTIVE_FIELDS, MergeKey, MessageState

VERSION = 2
_HEADER = struct.Struct(">BII")
_KEY = struct.Struct(">hqI16s")
_SUPPLIER = struct.Struct(">II")
_NUMBER = {name: DeliveryReport.DESCRIPTOR.fields_by_name[name].number for name in DESCRIPTIVE_FIELDS}
_NAME = {number: name for name, number in _NUMBER.items()}
_NS = 1_000_000_000


def encode_merge(state: MessageState) -> bytes:
    """The merge bookkeeping of a state (its winner's and field suppliers' keys), packed."""
    keys = [state.winner]
    positions = {state.winner.digest: 0}  # a digest names its key (and bytes cache their hash)
    suppliers = []
    for name, key in state.suppliers.items():
        position = positions.setdefault(key.digest, len(keys))
        if position == len(keys):
            keys.append(key)
        suppliers.append(_SUPPLIER.pack(_NUMBER[name], position))
    packed_keys = [_KEY.pack(key.rank, *divmod(key.time_ns, _NS), key.digest) for key in keys]
    return b"".join((_HEADER.pack(VERSION, len(keys), len(suppliers)), *packed_keys, *suppliers))


def decode_state(report: bytes, merge: bytes) -> MessageState:
    """The state of a message from its merged report and its packed bookkeeping."""
    version, key_count, supplier_count = _HEADER.unpack_from(merge)
    if version != VERSION:
        raise ValueError(f"merge bookkeeping of version {version}; this release reads version {VERSION}")
    offset = _HEADER.size
    keys = []
    for _ in range(key_count):
        rank, seconds, nanos, digest = _KEY.unpack_from(merge, offset)
        keys.append(MergeKey(rank, seconds * _NS + nanos, digest))
        offset += _KEY.size
    suppliers = {}
    for _ in range(supplier_count):
        number, position = _SUPPLIER.unpack_from(merge, offset)
        suppliers[_NAME[number]] = keys[position]
        offset += _SUPPLIER.size
    return MessageState(DeliveryReport.FromString(report), keys[0], suppliers)
