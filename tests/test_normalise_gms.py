"""GMS ("Hyber") callbacks to DeliveryReports: the seed examples, every mapping row, aliases, rejections."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import (
    Channel,
    DeliveryError,
    DeliveryReport,
    DeliveryStatus,
    GmsStatusCodes,
    RawStatus,
    Source,
)
from deliveryreport.v1.delivery_report_service_pb2 import Format
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise import NormalisedItem, PayloadError, Rejection
from tests.normalising import NORMALISER, RECEIVED, fixture, ts

S = DeliveryStatus


def normalise(payload: str, format: Format.ValueType = Format.FORMAT_GMS) -> list[NormalisedItem]:
    return NORMALISER.normalise(payload, format, RECEIVED)


def report_of(fields: dict[str, Any]) -> DeliveryReport:
    """The one report normalised from a single GMS object."""
    items = normalise(json.dumps(fields))
    assert len(items) == 1
    assert items[0].rejection is None, items[0].rejection
    assert items[0].report is not None
    return items[0].report


def rejection_of(payload: str) -> Rejection:
    items = normalise(payload)
    assert len(items) == 1
    assert items[0].report is None
    assert items[0].rejection is not None
    return items[0].rejection


def minimal(**extra: Any) -> dict[str, Any]:
    return {"message_id": "9f60ac8f-e721-5027-b838-e6fcb95fcd7a", "status": 2, **extra}


# --- the seed examples -------------------------------------------------------------------------------


@pytest.mark.parametrize("format", [Format.FORMAT_GMS, Format.FORMAT_UNSPECIFIED])
def test_seed_single_report_is_invalid_json_with_line_and_column(format: Format.ValueType) -> None:
    with pytest.raises(PayloadError) as raised:
        normalise(fixture("gms_single_malformed.json"), format)
    rejection = raised.value.rejection
    assert rejection.reason == ErrorReason.INVALID_JSON
    assert rejection.field == ""
    # `"extra_id": AD-6640-7006",`: the value starts at line 8, column 16.
    assert "line 8 column 16" in rejection.description
    assert str(raised.value) == rejection.description


def test_seed_batch() -> None:
    text = fixture("gms_batch.json")
    items = normalise(text, Format.FORMAT_UNSPECIFIED)

    expected = [
        DeliveryReport(
            source=Source.SOURCE_GMS,
            message_id="9f60ac8f-e721-5027-b838-e6fcb95fcd7a",
            reference="AD-6640-7006",
            recipient="+380961111111",
            channel=Channel.CHANNEL_SMS,
            status=S.DELIVERY_STATUS_DELIVERED,
            final=True,
            event_time=Timestamp(seconds=1477417294, nanos=667_000_000),
            received_time=RECEIVED,
            raw=RawStatus(gms=GmsStatusCodes(status=2, substatus=23, hyber_status=23011, sent_via="sms")),
        ),
        DeliveryReport(
            source=Source.SOURCE_GMS,
            message_id="e5ea7286-6849-52d7-9e1b-8719b736283e",
            reference="AD-6640-7007",
            recipient="+380962222222",
            channel=Channel.CHANNEL_SMS,
            status=S.DELIVERY_STATUS_EXPIRED,
            final=True,
            event_time=Timestamp(seconds=1477417299),
            received_time=RECEIVED,
            raw=RawStatus(gms=GmsStatusCodes(status=3, substatus=35, hyber_status=35015, sent_via="sms")),
        ),
        DeliveryReport(
            source=Source.SOURCE_GMS,
            message_id="8a3ff6c5-a1fb-4849-a54b-3c488753cb8b",
            reference="AD-6640-7008",
            recipient="+380963333333",
            channel=Channel.CHANNEL_VIBER,
            status=S.DELIVERY_STATUS_DELIVERED,
            final=True,
            event_time=Timestamp(seconds=1477417299, nanos=50_000_000),
            received_time=RECEIVED,
            raw=RawStatus(gms=GmsStatusCodes(status=2, substatus=23, hyber_status=23033, sent_via="viber")),
        ),
    ]
    assert [item.index for item in items] == [0, 1, 2]
    assert [item.rejection for item in items] == [None, None, None]
    decoded = json.loads(text)
    position = 0
    for item, want, original in zip(items, expected, decoded, strict=True):
        assert item.report is not None
        # The item's own text, in order, byte for byte: a slice of the payload that decodes to the item.
        assert item.report.raw_payload == item.raw
        assert item.raw.startswith('{\n      "number": "3809')
        assert item.raw.endswith('"\n   }')
        position = text.index(item.raw, position) + len(item.raw)
        assert json.loads(item.raw) == original
        want.raw_payload = item.raw
        assert item.report == want


def test_seed_batch_event_times_are_utc_milliseconds() -> None:
    items = normalise(fixture("gms_batch.json"))
    times = [MessageToDict(item.report)["eventTime"] for item in items if item.report is not None]
    assert times == ["2016-10-25T17:41:34.667Z", "2016-10-25T17:41:39Z", "2016-10-25T17:41:39.050Z"]


@pytest.mark.parametrize(
    ("name", "template_id"),
    [("gms_viber_template_matched.json", 6349599), ("gms_viber_template_unmatched.json", 0)],
)
def test_seed_viber_template_reports(name: str, template_id: int) -> None:
    text = fixture(name)
    items = normalise(text, Format.FORMAT_UNSPECIFIED)

    assert len(items) == 1
    assert items[0].index == 0
    assert items[0].raw == text.strip()
    assert items[0].report == DeliveryReport(
        source=Source.SOURCE_GMS,
        message_id="9f60ac8f-e721-5027-b838-e6fcb95fcd7a",
        reference="AD-6640-7006",
        recipient="+380961111111",
        channel=Channel.CHANNEL_VIBER,
        status=S.DELIVERY_STATUS_DELIVERED,
        final=True,
        event_time=Timestamp(seconds=1477417294, nanos=667_000_000),
        received_time=RECEIVED,
        raw=RawStatus(gms=GmsStatusCodes(status=2, substatus=23, hyber_status=23043, sent_via="viber")),
        template_id=template_id,
        raw_payload=text.strip(),
    )
    # 0 ("no template matched") is a value, not absence.
    assert items[0].report.HasField("template_id")


def test_get_report_with_aliases_and_error() -> None:
    text = fixture("gms_get_simple_whatsapp.json")
    items = normalise(text, Format.FORMAT_UNSPECIFIED)

    assert len(items) == 1
    assert items[0].report == DeliveryReport(
        source=Source.SOURCE_GMS,
        message_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        reference="AD-6640-7009",
        recipient="+380961111111",
        channel=Channel.CHANNEL_WHATSAPP,
        status=S.DELIVERY_STATUS_REJECTED,
        final=True,
        event_time=Timestamp(seconds=1477417294, nanos=667_000_000),
        received_time=RECEIVED,
        error=DeliveryError(code=36024, description="Phone number incorrect"),
        raw=RawStatus(
            gms=GmsStatusCodes(
                status=3,
                substatus=36,
                hyber_status=36024,
                error_code=36024,
                sent_via="whatsapp",
                status_text="Phone number incorrect",
            )
        ),
        raw_payload=text.strip(),
    )


# --- docs/normalisation.md §3: every GMS mapping row, first match wins --------------------------------------


@pytest.mark.parametrize(
    ("codes", "status", "final"),
    [
        pytest.param(
            {"status": 3, "sent_via": "hyber"}, S.DELIVERY_STATUS_REJECTED, True, id="platform-blocked"
        ),
        pytest.param(
            {"status": 3, "substatus": 35, "hyber_status": 35015, "sent_via": "hyber"},
            S.DELIVERY_STATUS_REJECTED,
            True,
            id="platform-blocked-wins-over-expired",
        ),
        pytest.param(
            {"status": 3, "last_partner": "HYBER"},
            S.DELIVERY_STATUS_REJECTED,
            True,
            id="platform-blocked-alias",
        ),
        pytest.param(
            {"status": 3, "substatus": 35, "hyber_status": 35015, "sent_via": "sms"},
            S.DELIVERY_STATUS_EXPIRED,
            True,
            id="hyber_status-35015",
        ),
        pytest.param(
            {"status": 3, "error_code": 35015, "sent_via": "sms"},
            S.DELIVERY_STATUS_EXPIRED,
            True,
            id="error_code-35015",
        ),
        pytest.param(
            {"status": 3, "substatus": 36, "hyber_status": 36024},
            S.DELIVERY_STATUS_REJECTED,
            True,
            id="substatus-36",
        ),
        pytest.param(
            {"status": 3, "substatus": 35, "hyber_status": 35099},
            S.DELIVERY_STATUS_UNDELIVERED,
            True,
            id="substatus-35",
        ),
        pytest.param({"status": 3}, S.DELIVERY_STATUS_FAILED, True, id="other-status-3"),
        pytest.param({"status": 3, "substatus": 99}, S.DELIVERY_STATUS_FAILED, True, id="status-3-sub-99"),
        pytest.param(
            {"status": 2, "substatus": 23, "hyber_status": 23011},
            S.DELIVERY_STATUS_DELIVERED,
            True,
            id="status-2",
        ),
        pytest.param(
            {"status": 2, "sent_via": "hyber"}, S.DELIVERY_STATUS_DELIVERED, True, id="status-2-via-hyber"
        ),
        pytest.param(
            {"status": 1, "substatus": 12}, S.DELIVERY_STATUS_ACCEPTED, False, id="status-1-substatus-12"
        ),
        pytest.param(
            {"status": 1, "substatus": 11}, S.DELIVERY_STATUS_SENT, False, id="status-1-substatus-11"
        ),
        pytest.param({"status": 1}, S.DELIVERY_STATUS_SENT, False, id="other-status-1"),
        pytest.param({"status": -1}, S.DELIVERY_STATUS_ACCEPTED, False, id="status-minus-1"),
        pytest.param({"status": 0}, S.DELIVERY_STATUS_UNSPECIFIED, False, id="status-0"),
        pytest.param(
            {"status": 4, "substatus": 47, "hyber_status": 47001},
            S.DELIVERY_STATUS_UNSPECIFIED,
            False,
            id="unknown-codes",
        ),
    ],
)
def test_status_mapping(codes: dict[str, Any], status: DeliveryStatus.ValueType, final: bool) -> None:
    report = report_of({"message_id": "m-1", **codes})
    assert report.status == status
    assert report.final is final


def test_unknown_codes_are_kept_raw() -> None:
    report = report_of(
        {
            "message_id": "m-1",
            "status": 4,
            "substatus": 47,
            "hyber_status": 47001,
            "error_code": 47002,
            "sent_via": "telegram",
            "status_text": "something new",
        }
    )
    assert report.status == S.DELIVERY_STATUS_UNSPECIFIED
    assert not report.final
    assert report.channel == Channel.CHANNEL_UNSPECIFIED
    assert report.raw == RawStatus(
        gms=GmsStatusCodes(
            status=4,
            substatus=47,
            hyber_status=47001,
            error_code=47002,
            sent_via="telegram",
            status_text="something new",
        )
    )


# --- aliases and field forms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipient",
    [
        {"number": 380961111111},
        {"number": "380961111111"},
        {"phone_number": "380961111111"},
        {"phone_number": 380961111111},
        {"number": "+380961111111"},
    ],
)
def test_recipient_forms(recipient: dict[str, Any]) -> None:
    assert report_of(minimal(**recipient)).recipient == "+380961111111"


def test_alphanumeric_recipient_is_kept() -> None:
    assert report_of(minimal(number="Viber-ID-42")).recipient == "Viber-ID-42"


@pytest.mark.parametrize("key", ["sent_via", "last_partner", "delivered_via"])
def test_channel_aliases(key: str) -> None:
    report = report_of(minimal(**{key: "viber"}))
    assert report.channel == Channel.CHANNEL_VIBER
    assert report.raw.gms.sent_via == "viber"


@pytest.mark.parametrize(
    ("sent_via", "channel"),
    [
        ("sms", Channel.CHANNEL_SMS),
        ("viber", Channel.CHANNEL_VIBER),
        ("whatsapp", Channel.CHANNEL_WHATSAPP),
        ("push", Channel.CHANNEL_PUSH),
        ("SMS", Channel.CHANNEL_SMS),
        ("hyber", Channel.CHANNEL_UNSPECIFIED),
        ("carrier-pigeon", Channel.CHANNEL_UNSPECIFIED),
    ],
)
def test_channels(sent_via: str, channel: Channel.ValueType) -> None:
    report = report_of(minimal(sent_via=sent_via))
    assert report.channel == channel
    assert report.raw.gms.sent_via == sent_via


@pytest.mark.parametrize(
    ("millis", "iso"),
    [
        (1477417294667, "2016-10-25T17:41:34.667Z"),
        (1477417299000, "2016-10-25T17:41:39Z"),
        (0, "1970-01-01T00:00:00Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        ("1477417294667", "2016-10-25T17:41:34.667Z"),
    ],
)
def test_time_is_epoch_milliseconds(millis: int | str, iso: str) -> None:
    report = report_of(minimal(time=millis))
    assert report.HasField("event_time")
    assert report.event_time == ts(iso)
    assert report.event_time.ToJsonString() == iso


def test_optional_fields_absent_are_unset() -> None:
    report = report_of({"message_id": "m-1", "status": 2})
    assert report == DeliveryReport(
        source=Source.SOURCE_GMS,
        message_id="m-1",
        status=S.DELIVERY_STATUS_DELIVERED,
        final=True,
        received_time=RECEIVED,
        raw=RawStatus(gms=GmsStatusCodes(status=2)),
        raw_payload='{"message_id": "m-1", "status": 2}',
    )
    for field in (
        "event_time",
        "sent_time",
        "parts_total",
        "parts_delivered",
        "template_id",
        "price",
        "error",
    ):
        assert not report.HasField(field), field
    for code in ("substatus", "hyber_status", "error_code"):
        assert not report.raw.gms.HasField(code), code


def test_nulls_count_as_absent() -> None:
    report = report_of(
        minimal(number=None, time=None, extra_id=None, sent_via=None, substatus=None, total_sms_parts=None)
    )
    assert report.recipient == ""
    assert report.reference == ""
    assert report.channel == Channel.CHANNEL_UNSPECIFIED
    assert not report.HasField("event_time")
    assert not report.HasField("parts_total")
    assert not report.raw.gms.HasField("substatus")


def test_sms_parts() -> None:
    report = report_of(minimal(total_sms_parts=3, delivered_sms_parts=2))
    assert report.parts_total == 3
    assert report.parts_delivered == 2


def test_delivered_parts_absent_when_nothing_went_by_sms() -> None:
    report = report_of(minimal(total_sms_parts=1))
    assert report.parts_total == 1
    assert not report.HasField("parts_delivered")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (
            {"error_code": 36024, "error_text": "bad number"},
            DeliveryError(code=36024, description="bad number"),
        ),
        ({"error_code": 36024}, DeliveryError(code=36024)),
        ({"error_text": "bad number"}, DeliveryError(description="bad number")),
    ],
)
def test_get_report_error(fields: dict[str, Any], error: DeliveryError) -> None:
    report = report_of(minimal(status=3, **fields))
    assert report.HasField("error")
    assert report.error == error


def test_no_error_fields_means_no_error() -> None:
    assert not report_of(minimal(status=3, status_text="Error")).HasField("error")


def test_status_given_as_digits_is_accepted() -> None:
    report = report_of({"message_id": "m-1", "status": "2"})
    assert report.status == S.DELIVERY_STATUS_DELIVERED
    assert report.raw.gms.status == 2


# --- rejections ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [
        ({"status": 2}, "message_id", "MISSING_FIELD"),
        ({"message_id": None, "status": 2}, "message_id", "MISSING_FIELD"),
        ({"message_id": 42, "status": 2}, "message_id", "WRONG_TYPE"),
        ({"message_id": "m-1"}, "status", "MISSING_FIELD"),
        ({"message_id": "m-1", "status": "two"}, "status", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": 2.5}, "status", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": True}, "status", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": 2**63}, "status", "INVALID_VALUE"),
        ({"message_id": "m-1", "status": 2**31}, "status", "INVALID_VALUE"),  # codes are int32
        (
            {"message_id": "m-1", "status": 2, "total_sms_parts": -(2**31) - 1},
            "total_sms_parts",
            "INVALID_VALUE",
        ),
        ({"message_id": "m-1", "status": 2, "substatus": [23]}, "substatus", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": 2, "number": -380}, "number", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": 2, "number": 3.8e11}, "number", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": 2, "sent_via": 1}, "sent_via", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": 2, "extra_id": {"a": 1}}, "extra_id", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": 2, "time": "yesterday"}, "time", "WRONG_TYPE"),
        ({"message_id": "m-1", "status": 2, "time": 10**17}, "time", "INVALID_VALUE"),
    ],
)
def test_single_object_rejection_names_the_field(fields: dict[str, Any], path: str, reason: str) -> None:
    rejection = rejection_of(json.dumps(fields))
    assert rejection.field == path
    assert ErrorReason.Name(rejection.reason) == reason
    assert path in rejection.description


def test_unpaired_surrogate_is_rejected_not_a_crash() -> None:
    rejection = rejection_of('{"message_id": "\\ud800", "status": 2}')
    assert rejection == Rejection(
        "message_id", ErrorReason.INVALID_VALUE, "message_id contains an unpaired surrogate"
    )


def test_batch_keeps_valid_items_beside_rejections_in_order() -> None:
    elements = [
        '{"message_id": "a", "status": 2, "number": "380961111111"}',
        '{"message_id":"b","status":1}',
        '{"status": 2, "number": 380962222222}',
        '{ "message_id" : "d" , "status" : 3 , "sent_via" : "hyber" }',
        '"not an object"',
        '{"message_id": "f", "status": "2x"}',
    ]
    payload = "[\n  " + ",\n  ".join(elements) + "\n]\n"
    items = normalise(payload, Format.FORMAT_UNSPECIFIED)

    assert [item.index for item in items] == [0, 1, 2, 3, 4, 5]
    assert [item.raw for item in items] == elements
    assert [item.report.message_id if item.report else None for item in items] == [
        "a",
        "b",
        None,
        "d",
        None,
        None,
    ]
    assert [item.report.raw_payload for item in items if item.report] == [
        elements[0],
        elements[1],
        elements[3],
    ]
    assert [item.rejection for item in items] == [
        None,
        None,
        Rejection("[2].message_id", ErrorReason.MISSING_FIELD, "[2].message_id is required"),
        None,
        Rejection("[4]", ErrorReason.WRONG_TYPE, "[4] must be a JSON object"),
        Rejection("[5].status", ErrorReason.WRONG_TYPE, "[5].status must be an integer, not a str"),
    ]
    assert [item.report.status for item in items if item.report] == [
        S.DELIVERY_STATUS_DELIVERED,
        S.DELIVERY_STATUS_SENT,
        S.DELIVERY_STATUS_REJECTED,
    ]
    for item in items:
        if item.report is not None:
            assert item.report.received_time == RECEIVED


def test_empty_batch_gives_no_items() -> None:
    assert normalise("[]") == []
