"""Format detection, the public surface, and typed provider messages taking the same path as JSON text."""

from __future__ import annotations

import json

import pytest
from google.protobuf.json_format import ParseDict

import dlrhub.normalise
from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import Format
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from deliveryreport.v1.provider_formats_pb2 import (
    GmsReport,
    GmsReports,
    SentSmsReport,
    SentSmsReportError,
    SentSmsReportPlatform,
    SentSmsReportPrice,
    SentSmsReports,
    SentSmsReportStatus,
)
from dlrhub.normalise import NormalisedItem, PayloadError, Rejection, detect_format, typed_payload
from dlrhub.normalise.document import decode
from tests.normalising import NORMALISER, RECEIVED, fixture


def normalise(payload: str, format: Format.ValueType = Format.FORMAT_UNSPECIFIED) -> list[NormalisedItem]:
    return NORMALISER.normalise(payload, format, RECEIVED)


def reports(items: list[NormalisedItem]) -> list[DeliveryReport]:
    """The reports, without raw_payload (typed input has no provider text of its own)."""
    result = []
    for item in items:
        assert item.rejection is None, item.rejection
        assert item.report is not None
        report = DeliveryReport()
        report.CopyFrom(item.report)
        report.ClearField("raw_payload")
        result.append(report)
    return result


def normalise_typed(typed: GmsReports | SentSmsReports) -> list[NormalisedItem]:
    text, format = typed_payload(typed)
    return normalise(text, format)


def test_public_surface() -> None:
    assert sorted(dlrhub.normalise.__all__) == [
        "CodeTable",
        "NormalisedItem",
        "Normaliser",
        "PayloadError",
        "Rejection",
        "TooManyItems",
        "detect_format",
        "single_item_payload",
        "typed_payload",
    ]


# --- detection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "format"),
    [
        ("[]", Format.FORMAT_GMS),
        ('[{"message_id": "a", "status": 2}]', Format.FORMAT_GMS),
        ('[{"results": []}]', Format.FORMAT_GMS),
        ('{"message_id": "a", "status": 2}', Format.FORMAT_GMS),
        ('{"message_id": null}', Format.FORMAT_GMS),
        ('{"results": []}', Format.FORMAT_SENT_SMS_REPORT),
        ('{"results": null}', Format.FORMAT_SENT_SMS_REPORT),
        ('{"message_id": "a", "results": []}', Format.FORMAT_SENT_SMS_REPORT),
    ],
)
def test_detect_format(text: str, format: Format.ValueType) -> None:
    assert detect_format(decode(text)) == format


@pytest.mark.parametrize(
    "text", ["{}", '{"messageId": "a"}', '{"requestError": {}}', '"text"', "42", "null", "true"]
)
def test_undetectable_format(text: str) -> None:
    with pytest.raises(PayloadError) as raised:
        detect_format(decode(text))
    assert raised.value.rejection.field == ""
    assert raised.value.rejection.reason == ErrorReason.UNKNOWN_FORMAT


@pytest.mark.parametrize(
    ("name", "source", "count"),
    [
        ("gms_batch.json", Source.SOURCE_GMS, 3),
        ("gms_viber_template_matched.json", Source.SOURCE_GMS, 1),
        ("gms_viber_template_unmatched.json", Source.SOURCE_GMS, 1),
        ("gms_get_simple_whatsapp.json", Source.SOURCE_GMS, 1),
        ("sent_sms_report_pull.json", Source.SOURCE_SENT_SMS_REPORT, 2),
        ("sent_sms_report_push_new_spelling.json", Source.SOURCE_SENT_SMS_REPORT, 1),
        ("sent_sms_report_seen.json", Source.SOURCE_SENT_SMS_REPORT, 1),
    ],
)
def test_fixtures_are_detected(name: str, source: Source.ValueType, count: int) -> None:
    text = fixture(name)
    detected = normalise(text)
    assert [report.source for report in reports(detected)] == [source] * count
    explicit = Format.FORMAT_GMS if source == Source.SOURCE_GMS else Format.FORMAT_SENT_SMS_REPORT
    assert normalise(text, explicit) == detected


def test_explicit_format_is_not_second_guessed() -> None:
    with pytest.raises(PayloadError) as raised:
        normalise('[{"message_id": "a", "status": 2}]', Format.FORMAT_SENT_SMS_REPORT)
    assert raised.value.rejection.reason == ErrorReason.WRONG_TYPE

    items = normalise('{"results": []}', Format.FORMAT_GMS)
    assert items == [
        NormalisedItem(
            0,
            '{"results": []}',
            rejection=Rejection("message_id", ErrorReason.MISSING_FIELD, "message_id is required"),
            format=Format.FORMAT_GMS,
        )
    ]


def test_unknown_format_value() -> None:
    with pytest.raises(PayloadError) as raised:
        normalise('{"message_id": "a", "status": 2}', Format.ValueType(99))
    assert raised.value.rejection == Rejection("format", ErrorReason.INVALID_VALUE, "unknown format 99")


# --- typed payloads ----------------------------------------------------------------------------------------


def seed_batch_typed() -> GmsReports:
    return GmsReports(
        reports=[
            GmsReport(
                number="380961111111",
                time=1477417294667,
                status=2,
                substatus=23,
                hyber_status=23011,
                message_id="9f60ac8f-e721-5027-b838-e6fcb95fcd7a",
                extra_id="AD-6640-7006",
                sent_via="sms",
            ),
            GmsReport(
                number="380962222222",
                time=1477417299000,
                status=3,
                substatus=35,
                hyber_status=35015,
                message_id="e5ea7286-6849-52d7-9e1b-8719b736283e",
                extra_id="AD-6640-7007",
                sent_via="sms",
            ),
            GmsReport(
                number="380963333333",
                time=1477417299050,
                status=2,
                substatus=23,
                hyber_status=23033,
                message_id="8a3ff6c5-a1fb-4849-a54b-3c488753cb8b",
                extra_id="AD-6640-7008",
                sent_via="viber",
            ),
        ]
    )


def test_typed_gms_batch_normalises_like_its_json() -> None:
    typed = normalise_typed(seed_batch_typed())
    assert reports(typed) == reports(normalise(fixture("gms_batch.json")))
    assert [item.report.raw_payload for item in typed if item.report] == [item.raw for item in typed]


def test_typed_gms_payload_uses_the_provider_spelling() -> None:
    text, format = typed_payload(seed_batch_typed())
    assert format == Format.FORMAT_GMS
    assert json.loads(text)[0] == {
        "number": "380961111111",
        "time": 1477417294667,
        "status": 2,
        "substatus": 23,
        "hyber_status": 23011,
        "message_id": "9f60ac8f-e721-5027-b838-e6fcb95fcd7a",
        "extra_id": "AD-6640-7006",
        "sent_via": "sms",
    }


@pytest.mark.parametrize("name", ["gms_viber_template_matched.json", "gms_viber_template_unmatched.json"])
def test_typed_viber_template_report_normalises_like_its_json(name: str) -> None:
    original = json.loads(fixture(name))
    typed = GmsReports(reports=[ParseDict({**original, "number": str(original["number"])}, GmsReport())])
    assert reports(normalise_typed(typed)) == reports(normalise(fixture(name)))


def test_typed_gms_get_report_aliases() -> None:
    typed = GmsReports(
        reports=[
            GmsReport(
                phone_number="380961111111",
                time=1477417294667,
                status=3,
                substatus=36,
                hyber_status=36024,
                message_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                extra_id="AD-6640-7009",
                last_partner="whatsapp",
                status_text="Phone number incorrect",
                error_code=36024,
                error_text="Phone number incorrect",
            )
        ]
    )
    assert reports(normalise_typed(typed)) == reports(normalise(fixture("gms_get_simple_whatsapp.json")))


def seed_pull_typed() -> SentSmsReports:
    def one(message_id: str, to: str, at: str) -> SentSmsReport:
        return SentSmsReport(
            bulk_id="BULK-ID-123-xyz",
            message_id=message_id,
            to=to,
            sent_at=at,
            done_at=at,
            sms_count=1,
            price=SentSmsReportPrice(price_per_message="0.01", currency="EUR"),
            status=SentSmsReportStatus(
                group_id=3,
                group_name="DELIVERED",
                id=5,
                name="DELIVERED_TO_HANDSET",
                description="Message delivered to handset",
            ),
            error=SentSmsReportError(
                group_id=0, group_name="Ok", id=0, name="NO_ERROR", description="No Error", permanent=False
            ),
            entity_id="my-entity-id",
            application_id="my-application-id",
        )

    return SentSmsReports(
        results=[
            one("MESSAGE-ID-123-xyz", "41793026727", "2019-11-09T16:00:00.000+0000"),
            one("12db39c3-7822-4e72-a3ec-c87442c0ffc5", "41793026834", "2019-11-09T17:00:00.000+0000"),
        ]
    )


def test_typed_sent_sms_reports_normalise_like_their_json() -> None:
    typed = normalise_typed(seed_pull_typed())
    assert reports(typed) == reports(normalise(fixture("sent_sms_report_pull.json")))
    assert [item.report.raw_payload for item in typed if item.report] == [item.raw for item in typed]


def test_typed_sent_sms_report_payload_uses_the_provider_spelling() -> None:
    text, format = typed_payload(seed_pull_typed())
    assert format == Format.FORMAT_SENT_SMS_REPORT
    first = json.loads(text)["results"][0]
    assert sorted(first) == sorted(
        [
            "bulkId",
            "messageId",
            "to",
            "sentAt",
            "doneAt",
            "smsCount",
            "price",
            "status",
            "error",
            "entityId",
            "applicationId",
        ]
    )
    assert first["price"] == {"pricePerMessage": "0.01", "currency": "EUR"}
    assert first["error"]["groupId"] == 0


def test_typed_newer_spelling_normalises_like_its_json() -> None:
    typed = SentSmsReports(
        results=[
            SentSmsReport(
                bulk_id="BULK-7",
                message_id="MSG-NEW-1",
                to="+5511987654321",
                sender="InfoSMS",
                sent_at="2024-03-01T09:15:00.250-0300",
                done_at="2024-03-01T09:15:07.500-0300",
                message_count=2,
                mcc_mnc="72405",
                callback_data="order-42",
                price=SentSmsReportPrice(price_per_message="0.0075", currency="BRL"),
                status=SentSmsReportStatus(
                    group_id=2,
                    group_name="UNDELIVERABLE",
                    id=9,
                    name="UNDELIVERABLE_NOT_DELIVERED",
                    description="Message sent not delivered",
                    action="Check the number",
                ),
                error=SentSmsReportError(
                    group_id=1,
                    group_name="HANDSET_ERRORS",
                    id=1,
                    name="EC_UNKNOWN_SUBSCRIBER",
                    description="Unknown subscriber",
                    permanent=True,
                ),
                platform=SentSmsReportPlatform(entity_id="entity-new", application_id="app-new"),
            )
        ]
    )
    assert reports(normalise_typed(typed)) == reports(
        normalise(fixture("sent_sms_report_push_new_spelling.json"))
    )


def test_typed_seen_report_with_from_normalises_like_its_json() -> None:
    # `from` is a Python keyword, so the typed message is built from its JSON mapping.
    typed = SentSmsReports(
        results=[ParseDict(json.loads(fixture("sent_sms_report_seen.json"))["results"][0], SentSmsReport())]
    )
    typed_reports = reports(normalise_typed(typed))
    assert typed_reports == reports(normalise(fixture("sent_sms_report_seen.json")))
    assert typed_reports[0].status == DeliveryStatus.DELIVERY_STATUS_SEEN
    assert typed_reports[0].sender == "InfoSMS"


@pytest.mark.parametrize("name", ["messages_api_delivery.json", "messages_api_seen.json"])
def test_typed_messages_api_report_normalises_like_its_json(name: str) -> None:
    # The mirror carries `destination` and `event`; `campaignReferenceId` has no place in a report.
    text = fixture(f"providers/infobip/{name}")
    typed = SentSmsReports(
        results=[
            ParseDict(item, SentSmsReport(), ignore_unknown_fields=True)
            for item in json.loads(text)["results"]
        ]
    )
    typed_reports = reports(normalise_typed(typed))
    assert typed_reports == reports(normalise(text))
    assert typed_reports[0].recipient == "+41793026727"


def test_typed_mms_count_and_send_at_normalise_like_their_json() -> None:
    typed = SentSmsReports(
        results=[
            SentSmsReport(
                message_id="m",
                mms_count=2,
                send_at="2022-04-02T15:44:12.351Z",
                status=SentSmsReportStatus(group_id=1, id=26),
            )
        ]
    )
    text = json.dumps(
        {
            "results": [
                {
                    "messageId": "m",
                    "mmsCount": 2,
                    "sendAt": "2022-04-02T15:44:12.351Z",
                    "status": {"groupId": 1, "id": 26},
                }
            ]
        }
    )
    typed_reports = reports(normalise_typed(typed))
    assert typed_reports == reports(normalise(text))
    assert (typed_reports[0].channel, typed_reports[0].parts_total) == (Channel.CHANNEL_MMS, 2)


@pytest.mark.parametrize(
    ("typed", "rejection"),
    [
        (
            GmsReports(reports=[GmsReport(message_id="a", status=2), GmsReport(status=2)]),
            Rejection("[1].message_id", ErrorReason.MISSING_FIELD, "[1].message_id is required"),
        ),
        (
            GmsReports(reports=[GmsReport(message_id="a", status=2), GmsReport(message_id="b")]),
            Rejection(
                "[1].status",
                ErrorReason.MISSING_FIELD,
                "[1].status is required (or, in campaign status, an error_code the code table maps)",
            ),
        ),
        (
            SentSmsReports(
                results=[
                    SentSmsReport(message_id="a", seen_at="2019-11-09T16:00:00.000+0000"),
                    SentSmsReport(status=SentSmsReportStatus(group_id=3, id=5)),
                ]
            ),
            Rejection("results[1].messageId", ErrorReason.MISSING_FIELD, "results[1].messageId is required"),
        ),
        (
            SentSmsReports(
                results=[
                    SentSmsReport(message_id="a", seen_at="2019-11-09T16:00:00.000+0000"),
                    SentSmsReport(message_id="b"),
                ]
            ),
            Rejection(
                "results[1].status",
                ErrorReason.MISSING_FIELD,
                "results[1].status is required (or seenAt, for a seen report)",
            ),
        ),
    ],
)
def test_typed_rejections_name_the_provider_path(
    typed: GmsReports | SentSmsReports, rejection: Rejection
) -> None:
    items = normalise_typed(typed)
    assert [item.index for item in items] == [0, 1]
    assert items[0].report is not None
    assert items[1].report is None
    assert items[1].rejection == rejection


def test_empty_typed_batches() -> None:
    assert typed_payload(GmsReports()) == ("[]", Format.FORMAT_GMS)
    assert typed_payload(SentSmsReports()) == ('{"results": []}', Format.FORMAT_SENT_SMS_REPORT)
    assert normalise_typed(GmsReports()) == []
    assert normalise_typed(SentSmsReports()) == []
