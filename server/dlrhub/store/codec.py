"""MessageState to and from bytes, for any store engine."""

from __future__ import annotations

import json

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from dlrhub.merge import MergeKey, MessageState


def encode_merge(state: MessageState) -> bytes:
    """The merge bookkeeping of a state (its keys and field suppliers) as compact JSON."""
    keys = sorted(state.keys)
    index = {key: position for position, key in enumerate(keys)}
    return json.dumps(
        {
            "keys": [[key.rank, key.time_ns, key.digest.hex()] for key in keys],
            "suppliers": {name: index[key] for name, key in state.suppliers.items()},
        },
        separators=(",", ":"),
    ).encode()


def decode_state(report: bytes, merge: bytes) -> MessageState:
    data = json.loads(merge)
    keys = [MergeKey(rank, time_ns, bytes.fromhex(digest)) for rank, time_ns, digest in data["keys"]]
    return MessageState(
        DeliveryReport.FromString(report),
        frozenset(keys),
        {name: keys[position] for name, position in data["suppliers"].items()},
    )
