"""The merge bookkeeping's stored form: packed, and rows of earlier releases (JSON) still read."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from deliveryreport.v1.delivery_report_pb2 import (
    DeliveryReport,
    DeliveryStatus,
    GmsStatusCodes,
    RawStatus,
    Source,
)
from dlrhub.merge import DESCRIPTIVE_FIELDS, MergeKey, MessageState, merge
from dlrhub.store import SqliteStore
from dlrhub.store.codec import decode_state, encode_merge

S = DeliveryStatus
# Timestamps span years 1 to 9999: nanoseconds since the epoch overflow 64 bits at the top.
TIME_NS = st.integers(min_value=-62_135_596_800 * 10**9, max_value=253_402_300_799 * 10**9 + 999_999_999)
KEYS = st.builds(
    MergeKey, st.sampled_from([0, 10, 20, 30, 40, 50]), TIME_NS, st.binary(min_size=16, max_size=16)
)


def old_json_merge(state: MessageState) -> bytes:
    """How releases before the packed format stored the bookkeeping (kept to prove they still read)."""
    keys = sorted(state.keys)
    index = {key: position for position, key in enumerate(keys)}
    return json.dumps(
        {
            "keys": [[key.rank, key.time_ns, key.digest.hex()] for key in keys],
            "suppliers": {name: index[key] for name, key in state.suppliers.items()},
        },
        separators=(",", ":"),
    ).encode()


@st.composite
def states(draw: st.DrawFn) -> MessageState:
    keys = draw(st.lists(KEYS, min_size=1, max_size=40, unique_by=lambda key: key.digest))
    names = draw(st.lists(st.sampled_from(DESCRIPTIVE_FIELDS), unique=True))
    suppliers = {name: draw(st.sampled_from(keys)) for name in names}
    return MessageState(DeliveryReport(message_id="m-1"), frozenset(keys), suppliers)


@settings(max_examples=200)
@given(states())
def test_the_packed_form_round_trips(state: MessageState) -> None:
    packed = encode_merge(state)
    assert decode_state(state.report.SerializeToString(), packed) == state


@settings(max_examples=100)
@given(states())
def test_a_row_written_as_json_by_an_earlier_release_reads_the_same(state: MessageState) -> None:
    assert decode_state(state.report.SerializeToString(), old_json_merge(state)) == state


def test_a_message_stored_in_the_json_form_still_merges_and_detects_duplicates(tmp_path: Path) -> None:
    report = DeliveryReport(
        source=Source.SOURCE_GMS,
        message_id="m-1",
        status=S.DELIVERY_STATUS_SENT,
        event_time=Timestamp(seconds=1_700_000_000),
        raw=RawStatus(gms=GmsStatusCodes(status=1)),
        bulk_id="B-1",
    )
    store = SqliteStore(tmp_path / "dlrhub.db")
    with store.transaction() as tx:
        tx.append(report, merge(None, report).state)
    store.close()
    # Rewrite the row's bookkeeping as an earlier release wrote it.
    connection = sqlite3.connect(tmp_path / "dlrhub.db")
    with connection:
        connection.execute("UPDATE messages SET merge = ?", (old_json_merge(merge(None, report).state),))
    connection.close()

    store = SqliteStore(tmp_path / "dlrhub.db")
    with store.transaction() as tx:
        state = tx.load_state(Source.SOURCE_GMS, "m-1")
        assert state is not None
        assert merge(state, report).duplicate
        delivered = DeliveryReport()
        delivered.CopyFrom(report)
        delivered.status = S.DELIVERY_STATUS_DELIVERED
        delivered.ClearField("bulk_id")  # so the bulk id still comes from the first report
        delivered.event_time.seconds += 5
        merged = merge(state, delivered)
        assert not merged.duplicate
        tx.append(delivered, merged.state)
    # Written back in the packed form, and read again.
    with store.transaction() as tx:
        again = tx.load_state(Source.SOURCE_GMS, "m-1")
    store.close()
    assert again == merged.state
    assert again.report.status == S.DELIVERY_STATUS_DELIVERED
    assert again.suppliers["bulk_id"] == merge(None, report).state.winner


def test_a_message_with_more_reports_than_fit_in_16_bits_still_round_trips() -> None:
    keys = [MergeKey(10, n, n.to_bytes(16, "big")) for n in range(70_000)]
    state = MessageState(DeliveryReport(message_id="m-1"), frozenset(keys), {"bulk_id": keys[-1]})
    assert decode_state(state.report.SerializeToString(), encode_merge(state)) == state
