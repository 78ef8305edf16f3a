"""The merge bookkeeping's stored form: packed, bounded by the number of fields, not by the history.

Rows of earlier releases (JSON, then packed version 1, both with every key seen) are rebuilt by the
SQLite migration to schema 4: tests/test_sqlite_migration.py.
"""

from __future__ import annotations

import struct

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from deliveryreport.v1.delivery_report_pb2 import (
    DeliveryReport,
    DeliveryStatus,
    Price,
    RawStatus,
    SentSmsReportStatusCodes,
    Source,
)
from dlrhub.merge import DESCRIPTIVE_FIELDS, NO_EVENT_TIME, MergeKey, MessageState, merge
from dlrhub.store.codec import decode_state, encode_merge

S = DeliveryStatus
# Timestamps span years 1 to 9999: nanoseconds since the epoch overflow 64 bits at the top.
TIME_NS = st.just(NO_EVENT_TIME) | st.integers(
    min_value=-62_135_596_800 * 10**9, max_value=253_402_300_799 * 10**9 + 999_999_999
)
KEYS = st.builds(
    MergeKey, st.sampled_from([0, 10, 20, 30, 40, 50]), TIME_NS, st.binary(min_size=16, max_size=16)
)


@st.composite
def states(draw: st.DrawFn) -> MessageState:
    # A digest names one report, so one key: no two keys share a digest.
    keys = draw(st.lists(KEYS, min_size=1, max_size=13, unique_by=lambda key: key.digest))
    names = draw(st.lists(st.sampled_from(DESCRIPTIVE_FIELDS), unique=True))
    suppliers = {name: draw(st.sampled_from(keys)) for name in names}
    return MessageState(DeliveryReport(message_id="m-1"), max(keys), suppliers)


@settings(max_examples=200)
@given(states())
def test_the_packed_form_round_trips(state: MessageState) -> None:
    packed = encode_merge(state)
    assert decode_state(state.report.SerializeToString(), packed) == state


def history(count: int) -> list[DeliveryReport]:
    """`count` distinct reports of one message; the descriptive fields come and go."""
    reports = []
    for number in range(count):
        report = DeliveryReport(
            source=Source.SOURCE_SENT_SMS_REPORT,
            message_id="hot",
            status=S.DELIVERY_STATUS_SENT if number % 2 else S.DELIVERY_STATUS_ACCEPTED,
            raw=RawStatus(sent_sms_report=SentSmsReportStatusCodes(group_id=1, id=7 if number % 2 else 26)),
            event_time=Timestamp(seconds=1_700_000_000 + number),
        )
        if number % 3 == 0:
            report.price.CopyFrom(Price(amount=f"0.{number:04d}", currency="EUR"))
        if number % 5 == 0:
            report.bulk_id = f"B-{number}"
        reports.append(report)
    return reports


def test_the_bookkeeping_does_not_grow_with_the_history() -> None:
    """#19.2: the stored bookkeeping is the winner's key and one key per descriptive field."""
    # A header, at most three keys (the winner's, the price's and bulk id's suppliers), two suppliers.
    bound = 9 + 3 * 30 + 2 * 8
    state: MessageState | None = None
    for report in history(10_000):
        state = merge(state, report)
        assert len(encode_merge(state)) <= bound
    assert state is not None
    assert set(state.suppliers) == {"price", "bulk_id"}


@pytest.mark.parametrize(
    "merge_bytes",
    [
        pytest.param(b'{"keys":[],"suppliers":{}}', id="json"),
        pytest.param(struct.pack(">BII", 1, 0, 0), id="packed-version-1"),
    ],
)
def test_the_forms_of_earlier_releases_are_refused_by_name(merge_bytes: bytes) -> None:
    with pytest.raises(ValueError, match="version 2"):
        decode_state(DeliveryReport(message_id="m-1").SerializeToString(), merge_bytes)
