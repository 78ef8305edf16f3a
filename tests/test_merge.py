"""The merge rule of docs/normalisation.md §4 and §5: properties first, then one example per rule."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from deliveryreport.v1.delivery_report_pb2 import (
    Channel,
    DeliveryError,
    DeliveryReport,
    DeliveryStatus,
    GmsStatusCodes,
    Price,
    RawStatus,
    SentSmsReportStatusCodes,
    Source,
)
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.merge import DESCRIPTIVE_FIELDS, NO_EVENT_TIME, MessageState, digest, merge, merge_key
from dlrhub.normalise import Normaliser
from dlrhub.statuses import FINAL

S = DeliveryStatus
GMS = Source.SOURCE_GMS
SSR = Source.SOURCE_SENT_SMS_REPORT
MESSAGE_ID = "9f60ac8f-e721-5027-b838-e6fcb95fcd7a"

# docs/normalisation.md §3, written out again so the test also checks dlrhub.statuses.RANK.
SPEC_RANK: dict[int, int] = {
    S.DELIVERY_STATUS_UNSPECIFIED: 0,
    S.DELIVERY_STATUS_ACCEPTED: 10,
    S.DELIVERY_STATUS_SENT: 20,
    S.DELIVERY_STATUS_UNDELIVERED: 30,
    S.DELIVERY_STATUS_EXPIRED: 30,
    S.DELIVERY_STATUS_REJECTED: 30,
    S.DELIVERY_STATUS_FAILED: 30,
    S.DELIVERY_STATUS_DELIVERED: 40,
    S.DELIVERY_STATUS_SEEN: 50,
}

DescriptiveField = Literal[
    "bulk_id",
    "reference",
    "recipient",
    "sender",
    "mcc_mnc",
    "entity_id",
    "application_id",
    "price",
    "parts_total",
    "parts_delivered",
    "template_id",
    "sent_time",
]
# §5 "Which fields follow the winner": the descriptive fields (plus the SentSMSReport entity and
# application ids, which are descriptive too).
DESCRIPTIVE: tuple[DescriptiveField, ...] = (
    "bulk_id",
    "reference",
    "recipient",
    "sender",
    "mcc_mnc",
    "entity_id",
    "application_id",
    "price",
    "parts_total",
    "parts_delivered",
    "template_id",
    "sent_time",
)


# --- helpers -------------------------------------------------------------------------------------


def at(text: str) -> Timestamp:
    moment = Timestamp()
    moment.FromJsonString(text)
    return moment


def later(one: Timestamp, other: Timestamp) -> Timestamp:
    return max(one, other, key=Timestamp.ToNanoseconds)


def serialized(report: DeliveryReport) -> bytes:
    return report.SerializeToString(deterministic=True)


def copy_of(
    report: DeliveryReport, *, received_time: Timestamp | None = None, raw_payload: str | None = None
) -> DeliveryReport:
    copy = DeliveryReport()
    copy.CopyFrom(report)
    if received_time is not None:
        copy.received_time.CopyFrom(received_time)
    if raw_payload is not None:
        copy.raw_payload = raw_payload
    return copy


def fold(reports: Iterable[DeliveryReport]) -> MessageState:
    return fold_with_flags(reports)[0]


def fold_with_flags(reports: Iterable[DeliveryReport]) -> tuple[MessageState, list[bool]]:
    """The state after `reports`, merged as Ingest does: a report whose digest is stored already is a
    duplicate and is not merged. Also checks that merging it would change nothing either."""
    state: MessageState | None = None
    stored: set[bytes] = set()
    flags = []
    for report in reports:
        duplicate = digest(report) in stored
        flags.append(duplicate)
        if duplicate:
            assert state is not None
            assert merge(state, report) == state
            continue
        stored.add(digest(report))
        state = merge(state, report)
    assert state is not None
    return state, flags


def identity(report: DeliveryReport) -> bytes:
    """Duplicates are the same report apart from its arrival (received time, original text)."""
    return without_arrival(report)


def spec_key(report: DeliveryReport) -> tuple[int, bool, int, bytes]:
    """(rank, event time, tie-break), a report without event time before every timed one."""
    timed = report.HasField("event_time")
    return SPEC_RANK[report.status], timed, report.event_time.ToNanoseconds() if timed else 0, digest(report)


def present(report: DeliveryReport) -> set[str]:
    return {field.name for field, _ in report.ListFields()}


def spec_state(reports: Sequence[DeliveryReport]) -> tuple[DeliveryReport, dict[str, bytes]]:
    """The state §4 asks for, computed directly: the winner, each descriptive field from its best
    supplier (named by its digest)."""
    ranked = sorted(reports, key=spec_key)
    expected = copy_of(ranked[-1])
    suppliers: dict[str, bytes] = {}
    for name in DESCRIPTIVE:
        having = [report for report in ranked if name in present(report)]
        take(expected, having[-1] if having else DeliveryReport(), name)
        if having:
            suppliers[name] = digest(having[-1])
    return expected, suppliers


def changed(report: DeliveryReport, **fields: Any) -> DeliveryReport:
    """A copy of `report` with the fields given set anew (None clears one)."""
    copy = copy_of(report)
    for name, value in fields.items():
        take(copy, DeliveryReport() if value is None else DeliveryReport(**{name: value}), name)
    return copy


def take(target: DeliveryReport, source: DeliveryReport, name: str) -> None:
    """Sets `target`'s field `name` as `source` has it (or clears it)."""
    target.ClearField(name)  # type: ignore[arg-type]  # a DESCRIPTIVE name
    if name in present(source):
        field: dict[str, Any] = {name: getattr(source, name)}
        target.MergeFrom(DeliveryReport(**field))


def without_arrival(report: DeliveryReport) -> bytes:
    """The report without what depends on which copy arrived first (received time, original text)."""
    copy = copy_of(report)
    copy.ClearField("received_time")
    copy.ClearField("raw_payload")
    return serialized(copy)


def merged_in_every_order(*reports: DeliveryReport) -> DeliveryReport:
    """The merged report, after checking every arrival order gives the same state."""
    states = [fold(order) for order in itertools.permutations(reports)]
    for state in states[1:]:
        assert serialized(state.report) == serialized(states[0].report)
        assert (state.winner, state.suppliers) == (states[0].winner, states[0].suppliers)
    return states[0].report


def gms_raw(
    status: int,
    substatus: int | None = None,
    hyber_status: int | None = None,
    sent_via: str = "sms",
    error_code: int | None = None,
) -> RawStatus:
    return RawStatus(
        gms=GmsStatusCodes(
            status=status,
            substatus=substatus,
            hyber_status=hyber_status,
            sent_via=sent_via,
            error_code=error_code,
        )
    )


def ssr_raw(group_id: int, group_name: str, status_id: int, name: str) -> RawStatus:
    return RawStatus(
        sent_sms_report=SentSmsReportStatusCodes(
            group_id=group_id, group_name=group_name, id=status_id, name=name
        )
    )


SEEN_RAW = RawStatus(sent_sms_report=SentSmsReportStatusCodes(seen=True))


def written_report(
    source: Source.ValueType,
    status: DeliveryStatus.ValueType,
    raw: RawStatus,
    event_time: str | None,
    received_time: str,
    **fields: Any,
) -> DeliveryReport:
    """A report of the one message; `fields` sets descriptive fields, error and channel (default SMS)."""
    report = DeliveryReport(
        source=source,
        message_id=MESSAGE_ID,
        channel=fields.pop("channel", Channel.CHANNEL_SMS),
        status=status,
        final=status in FINAL,
        raw=raw,
        received_time=at(received_time),
        raw_payload=f'{{"id": "{MESSAGE_ID}", "status": "{S.Name(status)}", "at": "{event_time}"}}',
        **fields,
    )
    if event_time is not None:
        report.event_time.CopyFrom(at(event_time))
    return report


def ssr_report(
    status: DeliveryStatus.ValueType,
    raw: RawStatus,
    event_time: str | None,
    received_time: str,
    **fields: Any,
) -> DeliveryReport:
    return written_report(SSR, status, raw, event_time, received_time, **fields)


def gms_report(
    status: DeliveryStatus.ValueType,
    raw: RawStatus,
    event_time: str | None,
    received_time: str,
    **fields: Any,
) -> DeliveryReport:
    return written_report(GMS, status, raw, event_time, received_time, **fields)


# --- strategies ----------------------------------------------------------------------------------

EPOCH = 1_573_315_200  # 2019-11-09T16:00:00Z

# A narrow range, so equal event times, received times and ties between them all happen.
moments = st.builds(Timestamp, seconds=st.integers(EPOCH, EPOCH + 3), nanos=st.sampled_from([0, 500_000_000]))

gms_codes = st.builds(
    GmsStatusCodes,
    status=st.sampled_from([-1, 1, 2, 3]),
    substatus=st.none() | st.sampled_from([11, 12, 23, 35, 36]),
    hyber_status=st.none() | st.sampled_from([23011, 23033, 23043, 35015, 36024]),
    error_code=st.none() | st.sampled_from([35015, 36024]),
    sent_via=st.sampled_from(["sms", "viber", "whatsapp", "push", "hyber", ""]),
    status_text=st.sampled_from(["", "Delivered"]),
)
ssr_codes = st.builds(SentSmsReportStatusCodes, seen=st.just(True)) | st.builds(
    SentSmsReportStatusCodes,
    group_id=st.integers(1, 5),
    group_name=st.sampled_from(["", "DELIVERED", "PENDING"]),
    id=st.sampled_from([2, 3, 5, 7, 9, 15, 26, 29]),
    name=st.sampled_from(["", "DELIVERED_TO_HANDSET"]),
    description=st.sampled_from(["", "Message delivered to handset"]),
    action=st.sampled_from(["", "retry"]),
)
errors = st.builds(
    DeliveryError,
    code=st.sampled_from([1, 6, 36024]),
    name=st.sampled_from(["", "EC_UNKNOWN_SUBSCRIBER"]),
    group_id=st.integers(0, 3),
    group_name=st.sampled_from(["", "HANDSET_ERRORS"]),
    description=st.sampled_from(["", "phone number incorrect"]),
    permanent=st.none() | st.booleans(),
)
prices = st.builds(
    Price, amount=st.sampled_from(["0.01", "0.0075"]), currency=st.sampled_from(["EUR", "USD"])
)
# "" is how a string field is absent.
texts = st.sampled_from(["", "a", "b"])
payloads = st.sampled_from(['{"a": 1}', '{"b": 2}', "[]", "{}"])


@st.composite
def reports(draw: st.DrawFn, source: Source.ValueType) -> DeliveryReport:
    status = draw(st.sampled_from(DeliveryStatus.values()))
    raw = RawStatus(gms=draw(gms_codes)) if source == GMS else RawStatus(sent_sms_report=draw(ssr_codes))
    return DeliveryReport(
        source=source,
        message_id=MESSAGE_ID,
        status=status,
        final=status in FINAL,
        channel=draw(st.sampled_from(Channel.values())),
        raw=raw,
        error=draw(st.none() | errors),
        event_time=draw(st.none() | moments),
        received_time=draw(moments),
        raw_payload=draw(payloads),
        bulk_id=draw(texts),
        reference=draw(texts),
        recipient=draw(st.sampled_from(["", "+380961111111", "InfoSMS"])),
        sender=draw(texts),
        mcc_mnc=draw(st.sampled_from(["", "22801", "25501"])),
        entity_id=draw(texts),
        application_id=draw(texts),
        price=draw(st.none() | prices),
        parts_total=draw(st.none() | st.integers(0, 3)),
        parts_delivered=draw(st.none() | st.integers(0, 3)),
        template_id=draw(st.none() | st.sampled_from([0, 6349599])),
        sent_time=draw(st.none() | moments),
    )


# Distinct reports (no two are duplicates) of one message: same source and message id.
distinct_reports = st.sampled_from([GMS, SSR]).flatmap(
    lambda source: st.lists(reports(source), min_size=1, max_size=6, unique_by=identity)
)


@st.composite
def same_codes_and_time(draw: st.DrawFn) -> list[DeliveryReport]:
    """Distinct reports of one message with the same status, raw codes, error, event time and
    channel: they differ only in descriptive fields (and arrival)."""
    first, *others = draw(st.lists(reports(draw(st.sampled_from([GMS, SSR]))), min_size=2, max_size=6))
    distinct = {identity(first): first}
    for other in others:
        variant = copy_of(first, received_time=other.received_time, raw_payload=other.raw_payload)
        for name in DESCRIPTIVE:
            take(variant, other, name)
        distinct.setdefault(identity(variant), variant)
    return list(distinct.values())


SETTINGS = settings(max_examples=200, deadline=None)


# --- properties ----------------------------------------------------------------------------------


def test_the_descriptive_fields_are_those_of_the_spec() -> None:
    assert set(DESCRIPTIVE_FIELDS) == set(DESCRIPTIVE)


@SETTINGS
@given(distinct=distinct_reports)
def test_the_state_is_the_winner_with_descriptive_fields_from_the_best_supplier(
    distinct: list[DeliveryReport],
) -> None:
    state, flags = fold_with_flags(distinct)
    expected, suppliers = spec_state(distinct)

    assert serialized(state.report) == serialized(expected)
    assert flags == [False] * len(distinct)
    assert state.winner == merge_key(max(distinct, key=spec_key))
    assert {name: key.digest for name, key in state.suppliers.items()} == suppliers
    for report in distinct:
        again = merge(state, copy_of(report))
        assert serialized(again.report) == serialized(state.report)
        assert (again.winner, again.suppliers) == (state.winner, state.suppliers)


@SETTINGS
@given(distinct=distinct_reports, data=st.data())
def test_any_order_with_exact_copies_ends_in_the_same_state(
    distinct: list[DeliveryReport], data: st.DataObject
) -> None:
    expected = fold(distinct)
    copies = [copy_of(report) for report in data.draw(st.lists(st.sampled_from(distinct), max_size=8))]
    arrival = data.draw(st.permutations([*distinct, *copies]))

    state, flags = fold_with_flags(arrival)

    assert serialized(state.report) == serialized(expected.report)
    assert state.winner == expected.winner
    assert state.suppliers == expected.suppliers
    seen = [identity(report) for report in arrival]
    assert flags == [seen[i] in seen[:i] for i in range(len(arrival))]
    assert flags.count(True) == len(copies)


@SETTINGS
@given(distinct=distinct_reports, data=st.data())
def test_copies_that_differ_only_in_arrival_are_duplicates_in_any_order(
    distinct: list[DeliveryReport], data: st.DataObject
) -> None:
    expected = fold(distinct)
    copies = []
    for original, received, payload in data.draw(
        st.lists(st.tuples(st.sampled_from(distinct), moments, st.sampled_from([" ", "\n", "\t  "]))),
    ):
        # Any received time, with or without an event time: the order never depends on it.
        copies.append(
            copy_of(original, received_time=received, raw_payload=payload + original.raw_payload + payload)
        )
    arrival = data.draw(st.permutations([*distinct, *copies]))

    state, flags = fold_with_flags(arrival)

    assert without_arrival(state.report) == without_arrival(expected.report)
    assert state.winner == expected.winner
    assert state.suppliers == expected.suppliers
    assert flags.count(True) == len(copies)
    # The received time and original text are those of the first copy of the winner to arrive.
    first_of_winner = next(r for r in arrival if digest(r) == expected.winner.digest)
    assert state.report.received_time == first_of_winner.received_time
    assert state.report.raw_payload == first_of_winner.raw_payload


@SETTINGS
@given(distinct=same_codes_and_time(), data=st.data())
def test_reports_that_share_codes_and_time_end_in_the_same_state_in_any_order(
    distinct: list[DeliveryReport], data: st.DataObject
) -> None:
    """Not the first to arrive wins, but the greatest digest (#19.6)."""
    expected, suppliers = spec_state(distinct)
    copies = [
        copy_of(original, received_time=received)
        for original, received in data.draw(
            st.lists(st.tuples(st.sampled_from(distinct), moments), max_size=6)
        )
    ]
    arrival = data.draw(st.permutations([*distinct, *copies]))

    state, flags = fold_with_flags(arrival)

    assert without_arrival(state.report) == without_arrival(expected)
    assert {name: key.digest for name, key in state.suppliers.items()} == suppliers
    assert flags.count(True) == len(copies)


# --- §4: a non-final status never replaces a final one -------------------------------------------

FINAL_REPORTS = [
    (GMS, S.DELIVERY_STATUS_UNDELIVERED, gms_raw(3, 35)),
    (GMS, S.DELIVERY_STATUS_EXPIRED, gms_raw(3, 35, 35015)),
    (GMS, S.DELIVERY_STATUS_REJECTED, gms_raw(3, 36, 36024)),
    (GMS, S.DELIVERY_STATUS_FAILED, gms_raw(3)),
    (GMS, S.DELIVERY_STATUS_DELIVERED, gms_raw(2, 23, 23011)),
    (SSR, S.DELIVERY_STATUS_UNDELIVERED, ssr_raw(2, "UNDELIVERABLE", 9, "UNDELIVERABLE_NOT_DELIVERED")),
    (SSR, S.DELIVERY_STATUS_EXPIRED, ssr_raw(4, "EXPIRED", 29, "EXPIRED_DLR_UNKNOWN")),
    (SSR, S.DELIVERY_STATUS_REJECTED, ssr_raw(5, "REJECTED", 6, "REJECTED_NETWORK")),
    (SSR, S.DELIVERY_STATUS_DELIVERED, ssr_raw(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET")),
    (SSR, S.DELIVERY_STATUS_SEEN, SEEN_RAW),
]
NON_FINAL_REPORTS = {
    GMS: [
        (S.DELIVERY_STATUS_UNSPECIFIED, gms_raw(7)),
        (S.DELIVERY_STATUS_ACCEPTED, gms_raw(1, 12)),
        (S.DELIVERY_STATUS_SENT, gms_raw(1, 11)),
    ],
    SSR: [
        (S.DELIVERY_STATUS_UNSPECIFIED, ssr_raw(9, "", 99, "")),
        (S.DELIVERY_STATUS_ACCEPTED, ssr_raw(1, "PENDING", 26, "PENDING_ACCEPTED")),
        (S.DELIVERY_STATUS_SENT, ssr_raw(1, "PENDING", 7, "PENDING_ENROUTE")),
        (S.DELIVERY_STATUS_SENT, ssr_raw(3, "DELIVERED", 2, "DELIVERED_TO_OPERATOR")),
    ],
}


@pytest.mark.parametrize(
    ("source", "final_status", "final_raw", "other_status", "other_raw"),
    [
        pytest.param(
            source,
            final_status,
            final_raw,
            other_status,
            other_raw,
            id=f"{Source.Name(source)}-{S.Name(final_status)}-then-{S.Name(other_status)}",
        )
        for source, final_status, final_raw in FINAL_REPORTS
        for other_status, other_raw in NON_FINAL_REPORTS[source]
    ],
)
def test_a_non_final_status_never_replaces_a_final_one(
    source: Source.ValueType,
    final_status: DeliveryStatus.ValueType,
    final_raw: RawStatus,
    other_status: DeliveryStatus.ValueType,
    other_raw: RawStatus,
) -> None:
    build = gms_report if source == GMS else ssr_report
    final = build(final_status, final_raw, "2019-11-09T16:00:00Z", "2019-11-09T16:00:01Z")
    # Later in every way: event time, received time.
    later = build(other_status, other_raw, "2019-11-09T16:05:00Z", "2019-11-09T16:05:01Z")

    merged = merged_in_every_order(final, later)

    assert merged.status == final_status
    assert merged.final
    assert merged.raw == final_raw
    assert merged.event_time == at("2019-11-09T16:00:00Z")


# --- §4: SEEN always wins ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (S.DELIVERY_STATUS_DELIVERED, ssr_raw(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET")),
        (S.DELIVERY_STATUS_EXPIRED, ssr_raw(4, "EXPIRED", 15, "EXPIRED_EXPIRED")),
        (S.DELIVERY_STATUS_UNDELIVERED, ssr_raw(2, "UNDELIVERABLE", 9, "UNDELIVERABLE_NOT_DELIVERED")),
        (S.DELIVERY_STATUS_SENT, ssr_raw(1, "PENDING", 7, "PENDING_ENROUTE")),
        (S.DELIVERY_STATUS_UNSPECIFIED, ssr_raw(9, "", 99, "")),
    ],
)
def test_seen_always_wins(status: DeliveryStatus.ValueType, raw: RawStatus) -> None:
    # Even against reports with a later event time.
    seen = ssr_report(
        S.DELIVERY_STATUS_SEEN,
        SEEN_RAW,
        "2019-11-09T16:00:00Z",
        "2019-11-09T16:00:01Z",
        channel=Channel.CHANNEL_VIBER,
    )
    other = ssr_report(status, raw, "2019-11-09T16:30:00Z", "2019-11-09T16:30:01Z")

    merged = merged_in_every_order(seen, other)

    assert merged.status == S.DELIVERY_STATUS_SEEN
    assert merged.raw == SEEN_RAW
    assert merged.channel == Channel.CHANNEL_VIBER
    assert merged.event_time == at("2019-11-09T16:00:00Z")


# --- §4: DELIVERED replaces a final failure ------------------------------------------------------


@pytest.mark.parametrize("delivered_at", ["2019-11-09T16:30:00Z", "2019-11-09T16:05:00Z"])
def test_a_late_delivery_replaces_expired_dlr_unknown(delivered_at: str) -> None:
    expired = ssr_report(
        S.DELIVERY_STATUS_EXPIRED,
        ssr_raw(4, "EXPIRED", 29, "EXPIRED_DLR_UNKNOWN"),
        "2019-11-09T16:10:00Z",
        "2019-11-09T16:10:01Z",
        error=DeliveryError(code=6, name="EC_ABSENT_SUBSCRIBER_SM", group_id=1, permanent=False),
    )
    # Received last either way; its event time is after the expiry, or before it (rank decides).
    delivered = ssr_report(
        S.DELIVERY_STATUS_DELIVERED,
        ssr_raw(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET"),
        delivered_at,
        "2019-11-09T16:40:00Z",
    )

    state = fold([expired, delivered])
    merged = merged_in_every_order(expired, delivered)

    assert serialized(state.report) == serialized(merged)
    assert merged.status == S.DELIVERY_STATUS_DELIVERED
    assert merged.final
    assert merged.raw == delivered.raw
    assert merged.event_time == at(delivered_at)
    assert not merged.HasField("error")


def test_viber_failing_then_sms_delivering_ends_delivered_by_sms() -> None:
    viber_failed = gms_report(
        S.DELIVERY_STATUS_UNDELIVERED,
        gms_raw(3, 35, sent_via="viber", error_code=35001),
        "2019-11-09T16:00:00Z",
        "2019-11-09T16:00:01Z",
        channel=Channel.CHANNEL_VIBER,
        error=DeliveryError(code=35001),
        reference="AD-6640-7006",
    )
    sms_delivered = gms_report(
        S.DELIVERY_STATUS_DELIVERED,
        gms_raw(2, 23, 23011, sent_via="sms"),
        "2019-11-09T16:02:00Z",
        "2019-11-09T16:02:01Z",
        channel=Channel.CHANNEL_SMS,
        recipient="+380961111111",
        parts_total=1,
        parts_delivered=1,
    )

    merged = merged_in_every_order(viber_failed, sms_delivered)

    assert merged.status == S.DELIVERY_STATUS_DELIVERED
    assert merged.channel == Channel.CHANNEL_SMS
    assert merged.raw == sms_delivered.raw
    assert not merged.HasField("error")
    assert (merged.parts_total, merged.parts_delivered) == (1, 1)
    # The failed report's reference is kept: the delivery report has none.
    assert merged.reference == "AD-6640-7006"


# --- §4: a failure never replaces DELIVERED or SEEN ----------------------------------------------


@pytest.mark.parametrize(
    ("winner_status", "winner_raw"),
    [
        (S.DELIVERY_STATUS_DELIVERED, ssr_raw(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET")),
        (S.DELIVERY_STATUS_SEEN, SEEN_RAW),
    ],
)
@pytest.mark.parametrize(
    ("failure_status", "failure_raw"),
    [
        (S.DELIVERY_STATUS_UNDELIVERED, ssr_raw(2, "UNDELIVERABLE", 9, "UNDELIVERABLE_NOT_DELIVERED")),
        (S.DELIVERY_STATUS_EXPIRED, ssr_raw(4, "EXPIRED", 15, "EXPIRED_EXPIRED")),
        (S.DELIVERY_STATUS_REJECTED, ssr_raw(5, "REJECTED", 6, "REJECTED_NETWORK")),
    ],
)
def test_a_failure_never_replaces_delivered_or_seen(
    winner_status: DeliveryStatus.ValueType,
    winner_raw: RawStatus,
    failure_status: DeliveryStatus.ValueType,
    failure_raw: RawStatus,
) -> None:
    winner = ssr_report(winner_status, winner_raw, "2019-11-09T16:00:00Z", "2019-11-09T16:00:01Z")
    failure = ssr_report(
        failure_status,
        failure_raw,
        "2019-11-09T16:30:00Z",
        "2019-11-09T16:30:01Z",
        error=DeliveryError(code=1, name="EC_UNKNOWN_SUBSCRIBER", group_id=1, permanent=True),
    )

    merged = merged_in_every_order(winner, failure)

    assert merged.status == winner_status
    assert merged.raw == winner_raw
    assert not merged.HasField("error")


# --- §4: between two failures the later event time wins; order by event time, not arrival ---------


@pytest.mark.parametrize(
    ("expired_at", "rejected_at", "expected"),
    [
        ("2019-11-09T16:00:00Z", "2019-11-09T16:30:00Z", S.DELIVERY_STATUS_REJECTED),
        ("2019-11-09T16:30:00Z", "2019-11-09T16:00:00Z", S.DELIVERY_STATUS_EXPIRED),
        ("2019-11-09T16:00:00.001Z", "2019-11-09T16:00:00Z", S.DELIVERY_STATUS_EXPIRED),
    ],
)
def test_between_two_failures_the_later_event_time_wins(
    expired_at: str, rejected_at: str, expected: DeliveryStatus.ValueType
) -> None:
    # Received in the opposite order to their event times.
    expired = ssr_report(
        S.DELIVERY_STATUS_EXPIRED, ssr_raw(4, "EXPIRED", 15, "EXPIRED_EXPIRED"), expired_at, rejected_at
    )
    rejected = ssr_report(
        S.DELIVERY_STATUS_REJECTED, ssr_raw(5, "REJECTED", 6, "REJECTED_NETWORK"), rejected_at, expired_at
    )

    merged = merged_in_every_order(expired, rejected)

    assert merged.status == expected
    assert merged.event_time == later(at(expired_at), at(rejected_at))


def test_order_is_by_event_time_never_by_arrival() -> None:
    rejected = gms_report(
        S.DELIVERY_STATUS_REJECTED, gms_raw(3, 36, 36024), "2019-11-09T16:20:00Z", "2019-11-09T16:21:00Z"
    )
    # Arrives later, but happened earlier.
    undelivered = gms_report(
        S.DELIVERY_STATUS_UNDELIVERED, gms_raw(3, 35), "2019-11-09T16:10:00Z", "2019-11-09T16:40:00Z"
    )

    first = merge(None, rejected)
    second = merge(first, undelivered)

    assert digest(undelivered) != digest(rejected)
    assert second.report.status == S.DELIVERY_STATUS_REJECTED
    assert serialized(second.report) == serialized(rejected)
    assert second.winner == merge_key(rejected)


def test_equal_rank_and_time_is_broken_the_same_way_in_every_order() -> None:
    # Same status, same event time, different raw codes: neither is a duplicate of the other.
    one = gms_report(S.DELIVERY_STATUS_FAILED, gms_raw(3, 30), "2019-11-09T16:00:00Z", "2019-11-09T16:00:01Z")
    other = gms_report(
        S.DELIVERY_STATUS_FAILED, gms_raw(3, 31), "2019-11-09T16:00:00Z", "2019-11-09T16:00:02Z"
    )

    merged = merged_in_every_order(one, other)

    assert merged.raw in (one.raw, other.raw)
    assert digest(one) != digest(other)


# --- §4/§5: duplicates ---------------------------------------------------------------------------

DELIVERED = ssr_report(
    S.DELIVERY_STATUS_DELIVERED,
    ssr_raw(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET"),
    "2019-11-09T16:00:00Z",
    "2019-11-09T16:00:01Z",
    bulk_id="BULK-ID-123-xyz",
    price=Price(amount="0.01", currency="EUR"),
)


def test_an_exact_duplicate_changes_nothing() -> None:
    state = merge(None, DELIVERED)

    copy = copy_of(DELIVERED)
    result = merge(state, copy)

    assert digest(copy) == digest(DELIVERED)
    assert serialized(result.report) == serialized(state.report)
    assert result.winner == state.winner
    assert result.suppliers == state.suppliers


@pytest.mark.parametrize("event_time", ["2019-11-09T16:00:00Z", None])
def test_a_copy_received_later_is_a_duplicate(event_time: str | None) -> None:
    """A retried report (other received time, other white space) is a duplicate and changes nothing."""
    first = ssr_report(
        S.DELIVERY_STATUS_EXPIRED,
        ssr_raw(4, "EXPIRED", 15, "EXPIRED_EXPIRED"),
        event_time,
        "2019-11-09T16:00:01Z",
    )
    retried = copy_of(
        first, received_time=at("2019-11-09T16:05:00Z"), raw_payload=first.raw_payload.replace(" ", "\n  ")
    )
    state = merge(None, first)

    result = merge(state, retried)

    assert digest(retried) == digest(first)
    assert serialized(result.report) == serialized(first)
    assert result.winner == merge_key(first)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(
            copy_of(DELIVERED, received_time=at("2019-11-09T16:00:01Z")), id="control-same-identity"
        ),
        pytest.param(changed(DELIVERED, event_time=at("2019-11-09T16:00:00.001Z")), id="other-event-time"),
        pytest.param(changed(DELIVERED, event_time=None), id="no-event-time"),
        pytest.param(changed(DELIVERED, channel=Channel.CHANNEL_VIBER), id="other-channel"),
        pytest.param(
            changed(DELIVERED, raw=ssr_raw(3, "DELIVERED", 5, "DELIVERED")), id="other-raw-status-name"
        ),
        pytest.param(
            copy_of(
                DELIVERED, received_time=at("2019-11-09T17:00:00Z"), raw_payload=DELIVERED.raw_payload + " "
            ),
            id="control-other-arrival",
        ),
        pytest.param(changed(DELIVERED, price=Price(amount="0.02", currency="EUR")), id="other-price"),
        pytest.param(changed(DELIVERED, bulk_id=None), id="no-bulk-id"),
    ],
)
def test_a_duplicate_is_the_same_report_apart_from_its_arrival(other: DeliveryReport) -> None:
    state, flags = fold_with_flags([DELIVERED, other])

    assert flags[1] == (identity(other) == identity(DELIVERED))
    assert (digest(other) == digest(DELIVERED)) == flags[1]
    if flags[1]:
        assert state == merge(None, DELIVERED)


# --- §4/§5: descriptive fields and the fields that follow the winner --------------------------------


def test_a_seen_report_takes_the_descriptive_fields_from_the_delivered_report() -> None:
    delivered = ssr_report(
        S.DELIVERY_STATUS_DELIVERED,
        ssr_raw(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET"),
        "2019-11-09T16:00:00Z",
        "2019-11-09T16:00:01Z",
        channel=Channel.CHANNEL_VIBER,
        bulk_id="BULK-ID-123-xyz",
        reference="callback-data",
        recipient="+41793026727",
        sender="InfoSMS",
        mcc_mnc="22801",
        entity_id="my-entity-id",
        application_id="my-application-id",
        price=Price(amount="0.01", currency="EUR"),
        parts_total=1,
        sent_time=at("2019-11-09T15:59:58Z"),
    )
    # A seen report has no price, parts or bulk id.
    seen = ssr_report(
        S.DELIVERY_STATUS_SEEN,
        SEEN_RAW,
        "2019-11-09T16:07:00Z",
        "2019-11-09T16:07:01Z",
        channel=Channel.CHANNEL_VIBER,
    )

    merged = merged_in_every_order(delivered, seen)

    assert merged.status == S.DELIVERY_STATUS_SEEN
    assert merged.raw == SEEN_RAW
    assert merged.event_time == at("2019-11-09T16:07:00Z")
    assert merged.received_time == at("2019-11-09T16:07:01Z")
    assert merged.raw_payload == seen.raw_payload
    assert merged.bulk_id == "BULK-ID-123-xyz"
    assert merged.reference == "callback-data"
    assert merged.recipient == "+41793026727"
    assert merged.sender == "InfoSMS"
    assert merged.mcc_mnc == "22801"
    assert merged.entity_id == "my-entity-id"
    assert merged.application_id == "my-application-id"
    assert merged.price == Price(amount="0.01", currency="EUR")
    assert merged.HasField("parts_total")
    assert merged.parts_total == 1
    assert merged.sent_time == at("2019-11-09T15:59:58Z")
    assert not merged.HasField("parts_delivered")
    assert not merged.HasField("template_id")


def test_each_descriptive_field_comes_from_the_highest_keyed_report_that_has_it() -> None:
    enroute = ssr_report(
        S.DELIVERY_STATUS_SENT,
        ssr_raw(1, "PENDING", 7, "PENDING_ENROUTE"),
        "2019-11-09T16:00:00Z",
        "2019-11-09T16:00:01Z",
        price=Price(amount="0.02", currency="EUR"),
        parts_total=2,
        mcc_mnc="22801",
    )
    delivered = ssr_report(
        S.DELIVERY_STATUS_DELIVERED,
        ssr_raw(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET"),
        "2019-11-09T16:01:00Z",
        "2019-11-09T16:01:01Z",
        price=Price(amount="0.01", currency="EUR"),
        mcc_mnc="22802",
    )
    seen = ssr_report(S.DELIVERY_STATUS_SEEN, SEEN_RAW, "2019-11-09T16:07:00Z", "2019-11-09T16:07:01Z")

    merged = merged_in_every_order(enroute, delivered, seen)

    assert merged.status == S.DELIVERY_STATUS_SEEN
    assert merged.price == Price(amount="0.01", currency="EUR")
    assert merged.mcc_mnc == "22802"
    assert merged.parts_total == 2


def test_a_template_id_of_zero_is_a_value_not_an_absence() -> None:
    # matching_template_id 0 = "no template matched": it is kept over a winner without the field.
    viber_delivered = gms_report(
        S.DELIVERY_STATUS_DELIVERED,
        gms_raw(2, 23, 23033, sent_via="viber"),
        "2019-11-09T16:00:00Z",
        "2019-11-09T16:00:01Z",
        channel=Channel.CHANNEL_VIBER,
        template_id=0,
        parts_total=0,
    )
    seen = gms_report(
        S.DELIVERY_STATUS_SEEN,
        gms_raw(2, 24, sent_via="viber"),
        "2019-11-09T16:05:00Z",
        "2019-11-09T16:05:01Z",
        channel=Channel.CHANNEL_VIBER,
    )

    merged = merged_in_every_order(viber_delivered, seen)

    assert merged.status == S.DELIVERY_STATUS_SEEN
    assert merged.HasField("template_id")
    assert merged.template_id == 0
    assert merged.HasField("parts_total")


@pytest.mark.parametrize("winner_has_error", [False, True])
def test_status_final_raw_error_event_time_and_channel_follow_the_winner(winner_has_error: bool) -> None:
    loser = ssr_report(
        S.DELIVERY_STATUS_UNDELIVERED,
        ssr_raw(2, "UNDELIVERABLE", 9, "UNDELIVERABLE_NOT_DELIVERED"),
        "2019-11-09T16:00:00Z",
        "2019-11-09T16:30:00Z",
        channel=Channel.CHANNEL_VIBER,
        error=DeliveryError(code=6, name="EC_ABSENT_SUBSCRIBER_SM", group_id=1, permanent=False),
        mcc_mnc="22801",
    )
    winner_error = DeliveryError(code=1, name="EC_UNKNOWN_SUBSCRIBER", group_id=1, permanent=True)
    winner = ssr_report(
        S.DELIVERY_STATUS_REJECTED,
        ssr_raw(5, "REJECTED", 6, "REJECTED_NETWORK"),
        "2019-11-09T16:10:00Z",
        "2019-11-09T16:10:01Z",
        channel=Channel.CHANNEL_SMS,
        error=winner_error if winner_has_error else None,
        mcc_mnc="22802",
    )

    merged = merged_in_every_order(loser, winner)

    assert merged.status == S.DELIVERY_STATUS_REJECTED
    assert merged.final
    assert merged.raw == winner.raw
    if winner_has_error:
        assert merged.error == winner_error
    else:
        # The winner has no error: the loser's error does not leak into the state.
        assert not merged.HasField("error")
    assert merged.event_time == at("2019-11-09T16:10:00Z")
    assert merged.channel == Channel.CHANNEL_SMS
    assert merged.received_time == at("2019-11-09T16:10:01Z")
    assert merged.raw_payload == winner.raw_payload
    # Both have MCC/MNC: the winner's.
    assert merged.mcc_mnc == "22802"


def test_a_winner_without_event_time_clears_the_event_time() -> None:
    timed = gms_report(S.DELIVERY_STATUS_FAILED, gms_raw(3), "2019-11-09T16:03:00Z", "2019-11-09T16:03:01Z")
    # No `time`, but a greater rank.
    untimed = gms_report(S.DELIVERY_STATUS_DELIVERED, gms_raw(2, 23, 23011), None, "2019-11-09T16:05:00Z")

    merged = merged_in_every_order(timed, untimed)

    assert merged.status == S.DELIVERY_STATUS_DELIVERED
    assert not merged.HasField("event_time")


# --- without event time: before every timed report of its rank, never by received time -----------


def test_a_report_without_event_time_sorts_before_a_timed_one_of_its_rank() -> None:
    timed = gms_report(S.DELIVERY_STATUS_FAILED, gms_raw(3), "2019-11-09T16:03:00Z", "2019-11-09T16:03:01Z")
    # Received later than the timed one happened: that says nothing about when it happened.
    untimed = gms_report(S.DELIVERY_STATUS_UNDELIVERED, gms_raw(3, 35), None, "2019-11-09T16:05:00Z")

    merged = merged_in_every_order(timed, untimed)

    assert merged.status == S.DELIVERY_STATUS_FAILED
    assert merged.event_time == at("2019-11-09T16:03:00Z")
    assert merge_key(untimed).time_ns == NO_EVENT_TIME


@pytest.mark.parametrize(
    ("expired_received", "rejected_received"),
    [("2019-11-09T16:00:00Z", "2019-11-09T16:05:00Z"), ("2019-11-09T16:05:00Z", "2019-11-09T16:00:00Z")],
)
def test_reports_without_event_time_never_order_by_received_time(
    expired_received: str, rejected_received: str
) -> None:
    """Which of two untimed reports of one rank wins is the same whenever each was received."""
    expired = gms_report(S.DELIVERY_STATUS_EXPIRED, gms_raw(3, 35, 35015), None, expired_received)
    rejected = gms_report(S.DELIVERY_STATUS_REJECTED, gms_raw(3, 36, 36024), None, rejected_received)
    winner = max(expired, rejected, key=digest)  # the tie-break: the greater digest

    merged = merged_in_every_order(expired, rejected)

    assert merged.status == winner.status
    assert merged.received_time == winner.received_time


def test_four_gms_reports_without_time_end_in_one_state_in_all_24_orders() -> None:
    """#19.6: four failures of one message without `time` gave four different final states."""
    received = [
        "2019-11-09T16:00:00Z",
        "2019-11-09T16:00:01Z",
        "2019-11-09T16:00:02Z",
        "2019-11-09T16:00:03Z",
    ]
    failures = [
        gms_report(S.DELIVERY_STATUS_FAILED, gms_raw(3), None, received[0]),
        gms_report(S.DELIVERY_STATUS_UNDELIVERED, gms_raw(3, 35), None, received[1]),
        gms_report(S.DELIVERY_STATUS_REJECTED, gms_raw(3, 36), None, received[2]),
        gms_report(S.DELIVERY_STATUS_EXPIRED, gms_raw(3, 35, 35015), None, received[3]),
    ]

    merged = merged_in_every_order(*failures)

    assert serialized(merged) == serialized(max(failures, key=digest))


# --- end to end through the real normaliser ------------------------------------------------------

GMS_COMPACT = (
    '{"number":380961111111,"time":1477417294667,"status":2,"substatus":23,"hyber_status":23011,'
    '"message_id":"9f60ac8f-e721-5027-b838-e6fcb95fcd7a","extra_id":"AD-6640-7006","sent_via":"sms",'
    '"total_sms_parts":1,"delivered_sms_parts":1}'
)
GMS_PRETTY = """
{
   "number": 380961111111,
   "time": 1477417294667,
   "status": 2,
   "substatus": 23,
   "hyber_status": 23011,
   "message_id": "9f60ac8f-e721-5027-b838-e6fcb95fcd7a",
   "extra_id": "AD-6640-7006",
   "sent_via": "sms",
   "total_sms_parts": 1,
   "delivered_sms_parts": 1
}
"""


def normalised(normaliser: Normaliser, text: str, received: str) -> DeliveryReport:
    (item,) = normaliser.normalise(text, Format.FORMAT_UNSPECIFIED, at(received))
    assert item.report is not None, item.rejection
    return item.report


def test_the_same_gms_report_with_other_white_space_merges_as_a_duplicate() -> None:
    normaliser = Normaliser.load()
    first = normalised(normaliser, GMS_COMPACT, "2019-11-09T16:00:00Z")
    again = normalised(normaliser, GMS_PRETTY, "2019-11-09T16:01:00Z")
    assert first.raw_payload != again.raw_payload
    assert first.received_time != again.received_time

    state, flags = fold_with_flags([first, again])

    assert flags == [False, True]
    assert state.report.status == S.DELIVERY_STATUS_DELIVERED
    assert state.report.raw_payload == GMS_COMPACT
    assert serialized(state.report) == serialized(merge(None, first).report)


def test_the_same_gms_report_at_another_time_is_not_a_duplicate() -> None:
    normaliser = Normaliser.load()
    first = normalised(normaliser, GMS_COMPACT, "2019-11-09T16:00:00Z")
    later = normalised(
        normaliser, GMS_COMPACT.replace("1477417294667", "1477417295000"), "2019-11-09T16:01:00Z"
    )

    state, flags = fold_with_flags([first, later])

    assert flags == [False, False]
    assert state.report.event_time == later.event_time
    assert state.winner == merge_key(later)
