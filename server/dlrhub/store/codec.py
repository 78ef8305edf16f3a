"""MessageState to and from bytes, for any store engine.

The merge bookkeeping (keys and field suppliers) is packed binary, written on
every accepted report:

    version 1 (byte) | key count (u32) | supplier count (u32)
    key count x      rank (i16) | event seconds (i64) | nanos (u32) | digest (16 bytes)
    supplier count x DeliveryReport field number (u32) | index into the keys (u32)

Fields are named by their protobuf field numbers, which never change. Rows
written by earlier releases hold JSON (starting with "{") and are still read.
"""

from __future__ import annotations

import json
import struct

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from dlrhub.merge import DESCRIPTIVE_FIELDS, MergeKey, MessageState

_VERSION = 1
_HEADER = struct.Struct(">BII")
_KEY = struct.Struct(">hqI16s")
_SUPPLIER = struct.Struct(">II")
_NUMBER = {name: DeliveryReport.DESCRIPTOR.fields_by_name[name].number for name in DESCRIPTIVE_FIELDS}
_NAME = {number: name for name, number in _NUMBER.items()}
_NS = 1_000_000_000


def encode_merge(state: MessageState) -> bytes:
    """The merge bookkeeping of a state (its keys and field suppliers), packed."""
    keys = sorted(state.keys)
    index = {key: position for position, key in enumerate(keys)}
    parts = [_HEADER.pack(_VERSION, len(keys), len(state.suppliers))]
    parts.extend(_KEY.pack(key.rank, *divmod(key.time_ns, _NS), key.digest) for key in keys)
    parts.extend(_SUPPLIER.pack(_NUMBER[name], index[key]) for name, key in state.suppliers.items())
    return b"".join(parts)


def decode_state(report: bytes, merge: bytes) -> MessageState:
    keys, suppliers = _decode_json(merge) if merge[:1] == b"{" else _decode_packed(merge)
    return MessageState(DeliveryReport.FromString(report), frozenset(keys), suppliers)


def _decode_packed(merge: bytes) -> tuple[list[MergeKey], dict[str, MergeKey]]:
    version, key_count, supplier_count = _HEADER.unpack_from(merge)
    if version != _VERSION:
        raise ValueError(f"merge bookkeeping of version {version}, newer than this release ({_VERSION})")
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
    return keys, suppliers


def _decode_json(merge: bytes) -> tuple[list[MergeKey], dict[str, MergeKey]]:
    """The format of releases before the packed one."""
    data = json.loads(merge)
    keys = [MergeKey(rank, time_ns, bytes.fromhex(digest)) for rank, time_ns, digest in data["keys"]]
    return keys, {name: keys[position] for name, position in data["suppliers"].items()}
