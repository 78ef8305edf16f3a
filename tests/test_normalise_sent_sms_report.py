"""SentSMSReport (Infobip-style) reports to DeliveryReports: the seed pull example, mapping, spellings."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deliveryreport.v1.delivery_report_pb2 import (
    Channel,
    DeliveryError,
    DeliveryReport,
    DeliveryStatus,
    Price,
    RawStatus,
    SentSmsReportStatusCodes,
    Source,
)
from deliveryreport.v1.delivery_report_service_pb2 import Format
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise import NormalisedItem, PayloadError, Rejection
from tests.normalising import NORMALISER, RECEIVED, fixture, ts

S = DeliveryStatus
DELIVERED_TO_HANDSET = {"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET"}


def normalise(payload: str, format: Format.ValueType = Format.FORMAT_SENT_SMS_REPORT) -> list[NormalisedItem]:
    return NORMALISER.normalise(payload, format, RECEIVED)


def report_of(fields: dict[str, Any]) -> DeliveryReport:
    """The one report normalised from `{"results": [fields]}`."""
    items = normalise(json.dumps({"results": [fields]}))
    assert len(items) == 1
    assert items[0].rejection is None, items[0].rejection
    assert items[0].report is not None
    return items[0].report


def rejection_of(fields: Any) -> Rejection:
    items = normalise(json.dumps({"results": [fields]}))
    assert len(items) == 1
    assert items[0].report is None
    assert items[0].rejection is not None
    return items[0].rejection


def delivered(**extra: Any) -> dict[str, Any]:
    return {"messageId": "MSG-1", "status": DELIVERED_TO_HANDSET, **extra}


# --- the seed example and the other fixtures ------------------------------------------------------------


def test_seed_pull_response() -> None:
    text = fixture("sent_sms_report_pull.json")
    items = normalise(text, Format.FORMAT_UNSPECIFIED)

    raw = RawStatus(
        sent_sms_report=SentSmsReportStatusCodes(
            group_id=3,
            group_name="DELIVERED",
            id=5,
            name="DELIVERED_TO_HANDSET",
            description="Message delivered to handset",
        )
    )
    expected = [
        DeliveryReport(
            source=Source.SOURCE_SENT_SMS_REPORT,
            message_id="MESSAGE-ID-123-xyz",
            bulk_id="BULK-ID-123-xyz",
            recipient="+41793026727",
            channel=Channel.CHANNEL_SMS,
            status=S.DELIVERY_STATUS_DELIVERED,
            final=True,
            event_time=ts("2019-11-09T16:00:00Z"),
            sent_time=ts("2019-11-09T16:00:00Z"),
            received_time=RECEIVED,
            parts_total=1,
            price=Price(amount="0.01", currency="EUR"),
            raw=raw,
            entity_id="my-entity-id",
            application_id="my-application-id",
        ),
        DeliveryReport(
            source=Source.SOURCE_SENT_SMS_REPORT,
            message_id="12db39c3-7822-4e72-a3ec-c87442c0ffc5",
            bulk_id="BULK-ID-123-xyz",
            recipient="+41793026834",
            channel=Channel.CHANNEL_SMS,
            status=S.DELIVERY_STATUS_DELIVERED,
            final=True,
            event_time=ts("2019-11-09T17:00:00Z"),
            sent_time=ts("2019-11-09T17:00:00Z"),
            received_time=RECEIVED,
            parts_total=1,
            price=Price(amount="0.01", currency="EUR"),
            raw=raw,
            entity_id="my-entity-id",
            application_id="my-application-id",
        ),
    ]
    assert [item.index for item in items] == [0, 1]
    assert [item.rejection for item in items] == [None, None]
    originals = json.loads(text)["results"]
    position = 0
    for item, want, original in zip(items, expected, originals, strict=True):
        assert item.report is not None
        # The item's own text, byte for byte and in order: a slice of the payload that decodes to it.
        assert item.report.raw_payload == item.raw
        assert item.raw.startswith('{\n"bulkId": "BULK-ID-123-xyz",\n"messageId": ')
        assert item.raw.endswith('\n"applicationId": "my-application-id"\n}')
        position = text.index(item.raw, position) + len(item.raw)
        assert json.loads(item.raw) == original
        want.raw_payload = item.raw
        assert item.report == want
        # NO_ERROR (group 0 / id 0) is no error at all.
        assert not item.report.HasField("error")


def test_push_with_newer_spelling() -> None:
    text = fixture("sent_sms_report_push_new_spelling.json")
    items = normalise(text, Format.FORMAT_UNSPECIFIED)

    assert len(items) == 1
    report = items[0].report
    assert report is not None
    want = DeliveryReport(
        source=Source.SOURCE_SENT_SMS_REPORT,
        message_id="MSG-NEW-1",
        bulk_id="BULK-7",
        reference="order-42",
        recipient="+5511987654321",
        sender="InfoSMS",
        channel=Channel.CHANNEL_SMS,
        status=S.DELIVERY_STATUS_UNDELIVERED,
        final=True,
        event_time=ts("2024-03-01T12:15:07.500Z"),
        sent_time=ts("2024-03-01T12:15:00.250Z"),
        received_time=RECEIVED,
        parts_total=2,
        price=Price(amount="0.0075", currency="BRL"),
        error=DeliveryError(
            code=1,
            name="EC_UNKNOWN_SUBSCRIBER",
            group_id=1,
            group_name="HANDSET_ERRORS",
            description="Unknown subscriber",
            permanent=True,
        ),
        raw=RawStatus(
            sent_sms_report=SentSmsReportStatusCodes(
                group_id=2,
                group_name="UNDELIVERABLE",
                id=9,
                name="UNDELIVERABLE_NOT_DELIVERED",
                description="Message sent not delivered",
                action="Check the number",
            )
        ),
        mcc_mnc="72405",
        entity_id="entity-new",
        application_id="app-new",
        raw_payload=items[0].raw,
    )
    assert report == want
    assert items[0].raw == text[text.index('{\n      "bulkId"') : text.rindex("}\n  ]") + 1]


def test_seen_report() -> None:
    text = fixture("sent_sms_report_seen.json")
    items = normalise(text, Format.FORMAT_UNSPECIFIED)

    assert len(items) == 1
    assert items[0].report == DeliveryReport(
        source=Source.SOURCE_SENT_SMS_REPORT,
        message_id="MSG-SEEN-1",
        recipient="+41793026727",
        sender="InfoSMS",
        channel=Channel.CHANNEL_VIBER,
        status=S.DELIVERY_STATUS_SEEN,
        final=True,
        # seenAt 2024-03-01T21:30:15.123-0300 is the next day in UTC.
        event_time=ts("2024-03-02T00:30:15.123Z"),
        sent_time=ts("2024-03-01T12:15:00Z"),
        received_time=RECEIVED,
        raw=RawStatus(sent_sms_report=SentSmsReportStatusCodes(seen=True)),
        entity_id="my-entity-id",
        application_id="my-application-id",
        raw_payload=items[0].raw,
    )
    assert items[0].raw.startswith('{\n      "messageId": "MSG-SEEN-1"')
    assert items[0].raw.endswith('"entityId": "my-entity-id"\n    }')


# --- docs/normalisation.md §3: every SentSMSReport mapping row --------------------------------------------


@pytest.mark.parametrize(
    ("group_id", "status_id", "status", "final"),
    [
        pytest.param(3, 5, S.DELIVERY_STATUS_DELIVERED, True, id="3-5-delivered-to-handset"),
        pytest.param(3, 2, S.DELIVERY_STATUS_SENT, False, id="3-2-delivered-to-operator"),
        pytest.param(3, 7, S.DELIVERY_STATUS_DELIVERED, True, id="other-group-3"),
        pytest.param(1, 3, S.DELIVERY_STATUS_SENT, False, id="1-3-pending-waiting-delivery"),
        pytest.param(1, 7, S.DELIVERY_STATUS_SENT, False, id="1-7-pending-enroute"),
        pytest.param(1, 26, S.DELIVERY_STATUS_ACCEPTED, False, id="1-26-pending-accepted"),
        pytest.param(1, 5, S.DELIVERY_STATUS_ACCEPTED, False, id="other-group-1"),
        pytest.param(2, 4, S.DELIVERY_STATUS_UNDELIVERED, True, id="2-4"),
        pytest.param(2, 9, S.DELIVERY_STATUS_UNDELIVERED, True, id="2-9"),
        pytest.param(2, 31, S.DELIVERY_STATUS_UNDELIVERED, True, id="2-31"),
        pytest.param(4, 15, S.DELIVERY_STATUS_EXPIRED, True, id="4-15"),
        pytest.param(4, 29, S.DELIVERY_STATUS_EXPIRED, True, id="4-29-dlr-unknown"),
        pytest.param(4, 87, S.DELIVERY_STATUS_EXPIRED, True, id="4-87"),
        pytest.param(5, 6, S.DELIVERY_STATUS_REJECTED, True, id="5-6"),
        pytest.param(5, 87, S.DELIVERY_STATUS_REJECTED, True, id="5-87"),
        pytest.param(5, 100, S.DELIVERY_STATUS_REJECTED, True, id="5-100"),
        pytest.param(0, 0, S.DELIVERY_STATUS_UNSPECIFIED, False, id="unknown-0-0"),
        pytest.param(6, 1, S.DELIVERY_STATUS_UNSPECIFIED, False, id="unknown-group-6"),
    ],
)
def test_status_mapping(group_id: int, status_id: int, status: DeliveryStatus.ValueType, final: bool) -> None:
    report = report_of({"messageId": "MSG-1", "status": {"groupId": group_id, "id": status_id}})
    assert report.status == status
    assert report.final is final
    assert report.raw.sent_sms_report == SentSmsReportStatusCodes(group_id=group_id, id=status_id)


def test_seen_report_maps_to_seen() -> None:
    report = report_of({"messageId": "MSG-1", "seenAt": "2019-11-09T16:05:00.000+0000"})
    assert report.status == S.DELIVERY_STATUS_SEEN
    assert report.final
    assert report.raw.sent_sms_report == SentSmsReportStatusCodes(seen=True)
    assert report.event_time == ts("2019-11-09T16:05:00Z")


def test_unknown_codes_are_kept_raw() -> None:
    status = {
        "groupId": 9,
        "groupName": "FUTURE",
        "id": 77,
        "name": "FUTURE_STATUS",
        "description": "new",
        "action": "wait",
    }
    report = report_of({"messageId": "MSG-1", "status": status})
    assert report.status == S.DELIVERY_STATUS_UNSPECIFIED
    assert not report.final
    assert report.raw == RawStatus(
        sent_sms_report=SentSmsReportStatusCodes(
            group_id=9, group_name="FUTURE", id=77, name="FUTURE_STATUS", description="new", action="wait"
        )
    )


# --- both spellings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["from", "sender"])
def test_sender_spellings(key: str) -> None:
    assert report_of(delivered(**{key: "InfoSMS"})).sender == "InfoSMS"


@pytest.mark.parametrize("key", ["smsCount", "messageCount"])
def test_part_count_spellings(key: str) -> None:
    report = report_of(delivered(**{key: 3}))
    assert report.parts_total == 3
    assert not report.HasField("parts_delivered")


@pytest.mark.parametrize(
    "fields",
    [
        {"entityId": "ent", "applicationId": "app"},
        {"platform": {"entityId": "ent", "applicationId": "app"}},
        {"entityId": "ent", "platform": {"applicationId": "app"}},
    ],
)
def test_entity_and_application_at_top_or_in_platform(fields: dict[str, Any]) -> None:
    report = report_of(delivered(**fields))
    assert (report.entity_id, report.application_id) == ("ent", "app")


def test_optional_fields_absent_are_unset() -> None:
    report = report_of({"messageId": "MSG-1", "status": {"groupId": 3, "id": 5}})
    assert report == DeliveryReport(
        source=Source.SOURCE_SENT_SMS_REPORT,
        message_id="MSG-1",
        channel=Channel.CHANNEL_SMS,
        status=S.DELIVERY_STATUS_DELIVERED,
        final=True,
        received_time=RECEIVED,
        raw=RawStatus(sent_sms_report=SentSmsReportStatusCodes(group_id=3, id=5)),
        raw_payload='{"messageId": "MSG-1", "status": {"groupId": 3, "id": 5}}',
    )
    for field in ("event_time", "sent_time", "parts_total", "price", "error", "template_id"):
        assert not report.HasField(field), field


def test_reference_bulk_and_mcc_mnc() -> None:
    report = report_of(delivered(bulkId="B-1", callbackData="ref-9", mccMnc="22801"))
    assert (report.bulk_id, report.reference, report.mcc_mnc) == ("B-1", "ref-9", "22801")


# --- times -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2019-11-09T16:00:00.000+0000", "2019-11-09T16:00:00Z"),
        ("2019-11-09T16:00:00.000-0300", "2019-11-09T19:00:00Z"),
        ("2019-11-09T22:30:00.000-0300", "2019-11-10T01:30:00Z"),
        ("2019-11-09T16:00:00.123+0530", "2019-11-09T10:30:00.123Z"),
        ("2019-11-09T16:00:00Z", "2019-11-09T16:00:00Z"),
        ("2019-11-09T16:00:00+00:00", "2019-11-09T16:00:00Z"),
        ("2019-11-09T16:00:00.000", "2019-11-09T16:00:00Z"),
    ],
)
def test_times_are_converted_to_utc(text: str, utc: str) -> None:
    report = report_of(delivered(sentAt=text, doneAt=text))
    assert report.event_time == ts(utc)
    assert report.sent_time == ts(utc)


@pytest.mark.parametrize(
    ("times", "event"),
    [
        ({"sentAt": "2019-11-09T16:00:00.000+0000", "doneAt": "2019-11-09T16:00:05.000+0000"}, "16:00:05"),
        ({"sentAt": "2019-11-09T16:00:00.000+0000"}, "16:00:00"),
        ({"doneAt": "2019-11-09T16:00:05.000+0000"}, "16:00:05"),
    ],
)
def test_event_time_is_done_at_else_sent_at(times: dict[str, str], event: str) -> None:
    report = report_of(delivered(**times))
    assert report.event_time == ts(f"2019-11-09T{event}Z")
    assert report.HasField("sent_time") is ("sentAt" in times)


def test_seen_report_event_time_is_seen_at() -> None:
    report = report_of(
        {
            "messageId": "MSG-1",
            "sentAt": "2019-11-09T16:00:00.000+0000",
            "seenAt": "2019-11-09T18:00:00.000-0300",
        }
    )
    assert report.status == S.DELIVERY_STATUS_SEEN
    assert report.event_time == ts("2019-11-09T21:00:00Z")
    assert report.sent_time == ts("2019-11-09T16:00:00Z")


# --- price -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("json_text", "amount"),
    [
        ("0.0075", "0.0075"),
        ("0.01", "0.01"),
        ("0.010", "0.010"),
        ("0.12345678901234567890", "0.12345678901234567890"),
        ("12345678901234567890.5", "12345678901234567890.5"),
        ("1", "1"),
        ('"0.0075"', "0.0075"),
        ('"0.12345678901234567890"', "0.12345678901234567890"),
    ],
)
def test_price_is_exact(json_text: str, amount: str) -> None:
    payload = (
        '{"results": [{"messageId": "MSG-1", "status": {"groupId": 3, "id": 5},'
        f' "price": {{"pricePerMessage": {json_text}, "currency": "EUR"}}}}]}}'
    )
    items = normalise(payload)
    assert items[0].report is not None
    assert items[0].report.price == Price(amount=amount, currency="EUR")


def test_price_without_amount_is_unset() -> None:
    assert not report_of(delivered(price={"currency": "EUR"})).HasField("price")


def test_price_is_per_message_not_multiplied_by_parts() -> None:
    report = report_of(delivered(smsCount=3, price={"pricePerMessage": "0.0075", "currency": "EUR"}))
    assert report.price.amount == "0.0075"


def priced(price: str) -> NormalisedItem:
    """The one item of a body (its format detected) whose report's pricePerMessage is `price`."""
    body = {
        "results": [
            {"messageId": "p", "status": {"groupId": 3, "id": 5}, "price": {"pricePerMessage": price}}
        ]
    }
    [item] = normalise(json.dumps(body), Format.FORMAT_UNSPECIFIED)
    return item


@pytest.mark.parametrize("price", ["1_000", "١٢", "0x10", " ", "1e", "."])
def test_a_price_that_is_not_a_plain_decimal_is_rejected(price: str) -> None:
    item = priced(price)
    assert item.rejection is not None
    assert (item.rejection.field, item.rejection.reason) == (
        "results[0].price.pricePerMessage",
        ErrorReason.WRONG_TYPE,
    )


@pytest.mark.parametrize("price", ["0.0075", "-1", "1.5E-3", "10", ".5"])
def test_a_plain_decimal_price_string_is_kept_as_given(price: str) -> None:
    item = priced(price)
    assert item.report is not None
    assert item.report.price.amount == price


# --- error -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        {
            "groupId": 0,
            "groupName": "Ok",
            "id": 0,
            "name": "NO_ERROR",
            "description": "No Error",
            "permanent": False,
        },
        {"groupId": 0, "id": 0},
        {},
    ],
)
def test_no_error_means_no_error_object(error: dict[str, Any]) -> None:
    assert not report_of(delivered(error=error)).HasField("error")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            {
                "groupId": 1,
                "groupName": "HANDSET_ERRORS",
                "id": 1,
                "name": "EC_UNKNOWN_SUBSCRIBER",
                "description": "Unknown subscriber",
                "permanent": True,
            },
            DeliveryError(
                code=1,
                name="EC_UNKNOWN_SUBSCRIBER",
                group_id=1,
                group_name="HANDSET_ERRORS",
                description="Unknown subscriber",
                permanent=True,
            ),
        ),
        (
            {
                "groupId": 1,
                "groupName": "HANDSET_ERRORS",
                "id": 6,
                "name": "EC_ABSENT_SUBSCRIBER_SM",
                "permanent": False,
            },
            DeliveryError(
                code=6,
                name="EC_ABSENT_SUBSCRIBER_SM",
                group_id=1,
                group_name="HANDSET_ERRORS",
                permanent=False,
            ),
        ),
        (
            {"groupId": 7, "groupName": "VIBER_ERRORS", "id": 4003},
            DeliveryError(code=4003, group_id=7, group_name="VIBER_ERRORS"),
        ),
    ],
)
def test_real_error_is_kept(error: dict[str, Any], expected: DeliveryError) -> None:
    report = report_of({"messageId": "MSG-1", "status": {"groupId": 2, "id": 9}, "error": error})
    assert report.error == expected
    assert report.error.HasField("permanent") is ("permanent" in error)


# --- channel and recipient ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "channel"),
    [
        ({}, Channel.CHANNEL_SMS),
        ({"channel": "SMS"}, Channel.CHANNEL_SMS),
        ({"channel": "VIBER"}, Channel.CHANNEL_VIBER),
        ({"channel": "VIBER_BM"}, Channel.CHANNEL_VIBER),
        ({"channel": "whatsapp"}, Channel.CHANNEL_WHATSAPP),
        ({"channel": "PUSH"}, Channel.CHANNEL_PUSH),
        # The Messages API delivery report's channel values (Infobip's MessagesApiInboundDlrChannel).
        ({"channel": "MMS"}, Channel.CHANNEL_MMS),
        ({"channel": "RCS"}, Channel.CHANNEL_RCS),
        ({"channel": "VIBER_BOT"}, Channel.CHANNEL_VIBER),
        ({"channel": "APPLE_MB"}, Channel.CHANNEL_APPLE_MESSAGES),
        ({"channel": "INSTAGRAM_DM"}, Channel.CHANNEL_INSTAGRAM),
        ({"channel": "LINE_ON"}, Channel.CHANNEL_LINE),
        ({"channel": "MESSENGER"}, Channel.CHANNEL_MESSENGER),
        ({"channel": "KAKAO"}, Channel.CHANNEL_KAKAO),
        ({"channel": "ZALO"}, Channel.CHANNEL_ZALO),
        ({"channel": "VOICE"}, Channel.CHANNEL_VOICE),
        ({"channel": "TELEGRAM"}, Channel.CHANNEL_TELEGRAM),
    ],
)
def test_channel_field_wins_over_sms_default(fields: dict[str, str], channel: Channel.ValueType) -> None:
    report = report_of(delivered(**fields))
    assert report.channel == channel
    assert report.raw.sent_sms_report.channel_name == ""


@pytest.mark.parametrize(
    ("to", "recipient"),
    [
        ("41793026727", "+41793026727"),
        ("+41793026727", "+41793026727"),
        ("InfoSMS", "InfoSMS"),
        ("viber:abc123", "viber:abc123"),
        (41793026727, "+41793026727"),
    ],
)
def test_recipient(to: str | int, recipient: str) -> None:
    assert report_of(delivered(to=to)).recipient == recipient


# --- rejections --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [
        ({"status": DELIVERED_TO_HANDSET}, "results[0].messageId", "MISSING_FIELD"),
        ({"messageId": 12, "status": DELIVERED_TO_HANDSET}, "results[0].messageId", "WRONG_TYPE"),
        ({"messageId": "M"}, "results[0].status", "MISSING_FIELD"),
        ({"messageId": "M", "status": "DELIVERED"}, "results[0].status", "WRONG_TYPE"),
        ({"messageId": "M", "status": {"groupId": 3, "id": "five"}}, "results[0].status.id", "WRONG_TYPE"),
        ({"messageId": "M", "seenAt": 1573315200}, "results[0].seenAt", "WRONG_TYPE"),
        ({**DELIVERED_TO_HANDSET, "messageId": "M"}, "results[0].status", "MISSING_FIELD"),
        (delivered(doneAt="yesterday"), "results[0].doneAt", "INVALID_VALUE"),
        (delivered(sentAt="2019-13-45T99:00:00.000+0000"), "results[0].sentAt", "INVALID_VALUE"),
        (delivered(doneAt="9999-12-31T23:00:00.000-0300"), "results[0].doneAt", "INVALID_VALUE"),
        (delivered(price={"pricePerMessage": "cheap"}), "results[0].price.pricePerMessage", "WRONG_TYPE"),
        (delivered(price={"pricePerMessage": "NaN"}), "results[0].price.pricePerMessage", "WRONG_TYPE"),
        (delivered(price={"pricePerMessage": True}), "results[0].price.pricePerMessage", "WRONG_TYPE"),
        (delivered(price=0.01), "results[0].price", "WRONG_TYPE"),
        (
            delivered(error={"groupId": 1, "id": 1, "permanent": "yes"}),
            "results[0].error.permanent",
            "WRONG_TYPE",
        ),
        (delivered(smsCount=1.5), "results[0].smsCount", "WRONG_TYPE"),
        (delivered(platform="web"), "results[0].platform", "WRONG_TYPE"),
        (delivered(platform={"entityId": 5}), "results[0].platform.entityId", "WRONG_TYPE"),
        (delivered(to=["41793026727"]), "results[0].to", "WRONG_TYPE"),
        (delivered(channel=1), "results[0].channel", "WRONG_TYPE"),
        (delivered(to="\ud800"), "results[0].to", "INVALID_VALUE"),
        ("not an object", "results[0]", "WRONG_TYPE"),
    ],
)
def test_rejection_names_the_field(fields: Any, path: str, reason: str) -> None:
    rejection = rejection_of(fields)
    assert rejection.field == path
    assert ErrorReason.Name(rejection.reason) == reason
    assert path in rejection.description


def test_batch_keeps_valid_items_beside_rejections_in_order() -> None:
    elements = [
        '{"messageId": "A", "status": {"groupId": 3, "id": 5}}',
        '{"messageId":"B","seenAt":"2019-11-09T16:00:00.000+0000"}',
        '{"messageId": "C", "status": {"groupId": 1, "id": 7}, "price": {"pricePerMessage": 0.0075}}',
        '{"to": "41793026727", "status": {"groupId": 3, "id": 5}}',
        '{ "messageId" : "E" , "status" : { "groupId" : 5 , "id" : 6 } }',
        '{"messageId": "F", "status": {"groupId": "three", "id": 5}}',
    ]
    payload = '{\n  "results": [\n    ' + ",\n    ".join(elements) + "\n  ]\n}\n"
    items = normalise(payload, Format.FORMAT_UNSPECIFIED)

    assert [item.index for item in items] == [0, 1, 2, 3, 4, 5]
    assert [item.raw for item in items] == elements
    assert [item.report.message_id if item.report else None for item in items] == [
        "A",
        "B",
        "C",
        None,
        "E",
        None,
    ]
    assert [item.report.raw_payload for item in items if item.report] == [
        elements[0],
        elements[1],
        elements[2],
        elements[4],
    ]
    assert [item.report.status for item in items if item.report] == [
        S.DELIVERY_STATUS_DELIVERED,
        S.DELIVERY_STATUS_SEEN,
        S.DELIVERY_STATUS_SENT,
        S.DELIVERY_STATUS_REJECTED,
    ]
    assert [item.rejection for item in items] == [
        None,
        None,
        None,
        Rejection("results[3].messageId", ErrorReason.MISSING_FIELD, "results[3].messageId is required"),
        None,
        Rejection(
            "results[5].status.groupId",
            ErrorReason.WRONG_TYPE,
            "results[5].status.groupId must be an integer, not a str",
        ),
    ]


def test_empty_results_gives_no_items() -> None:
    assert normalise('{"results": []}') == []


@pytest.mark.parametrize(
    ("payload", "rejection"),
    [
        (
            '{"result": []}',
            Rejection("results", ErrorReason.MISSING_FIELD, "results must be an array of reports"),
        ),
        (
            '{"results": null}',
            Rejection("results", ErrorReason.MISSING_FIELD, "results must be an array of reports"),
        ),
        (
            '{"results": {"messageId": "A"}}',
            Rejection("results", ErrorReason.WRONG_TYPE, "results must be an array of reports"),
        ),
        (
            '[{"messageId": "A"}]',
            Rejection(
                "", ErrorReason.WRONG_TYPE, 'a SentSMSReport payload must be an object {"results": [...]}'
            ),
        ),
    ],
)
def test_unusable_payload_raises(payload: str, rejection: Rejection) -> None:
    with pytest.raises(PayloadError) as raised:
        normalise(payload)
    assert raised.value.rejection == rejection


def test_service_error_body_is_not_reports() -> None:
    body = '{"requestError": {"serviceException": {"messageId": "BAD_REQUEST", "text": "Bad request"}}}'
    with pytest.raises(PayloadError) as raised:
        normalise(body, Format.FORMAT_UNSPECIFIED)
    assert raised.value.rejection.reason == ErrorReason.UNKNOWN_FORMAT
