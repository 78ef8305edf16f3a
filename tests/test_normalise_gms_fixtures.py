"""GMS shapes beyond the push callback: the GET answers, campaign status, the XML callback.

Each fixture is GMS's own documentation example (sources in tests/fixtures/providers/gms/SOURCES.md);
the expected reports are written from that documentation: Section 8's parameters and the code table.
"""

from __future__ import annotations

import itertools
import json

import pytest
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
from dlrhub.merge import merge
from dlrhub.normalise import NormalisedItem, PayloadError, Rejection, detect_format, single_item_payload
from dlrhub.normalise.document import decode
from tests.normalising import FIXTURES, NORMALISER, RECEIVED

S = DeliveryStatus
GMS = FIXTURES / "providers" / "gms"
MESSAGE_ID = "9f60ac8f-e721-5027-b838-e6fcb95fcd7a"
# "time": 1477417294667, Unix epoch milliseconds: 2016-10-25T17:41:34.667Z.
TIME = Timestamp(seconds=1477417294, nanos=667_000_000)


def normalise(payload: str, format: Format.ValueType = Format.FORMAT_UNSPECIFIED) -> list[NormalisedItem]:
    return NORMALISER.normalise(payload, format, RECEIVED)


def gms_report(raw_payload: str, /, **fields: object) -> DeliveryReport:
    """A GMS report of the documentation's message AD-6640-7006, with its original text."""
    report = DeliveryReport(
        source=Source.SOURCE_GMS,
        message_id=MESSAGE_ID,
        reference="AD-6640-7006",
        recipient="+380961111111",
        event_time=TIME,
        received_time=RECEIVED,
        raw_payload=raw_payload,
    )
    for name, value in fields.items():
        if isinstance(value, DeliveryReport | RawStatus | DeliveryError | Timestamp):
            getattr(report, name).CopyFrom(value)
        else:
            setattr(report, name, value)
    return report


SMS_DELIVERED = {
    "channel": Channel.CHANNEL_SMS,
    "status": S.DELIVERY_STATUS_DELIVERED,
    "final": True,
    "raw": RawStatus(gms=GmsStatusCodes(status=2, substatus=23, hyber_status=23011, sent_via="sms")),
}
VIBER_TEMPLATE_DELIVERED = {
    "channel": Channel.CHANNEL_VIBER,
    "status": S.DELIVERY_STATUS_DELIVERED,
    "final": True,
    "raw": RawStatus(gms=GmsStatusCodes(status=2, substatus=23, hyber_status=23043, sent_via="viber")),
    "template_id": 6349599,
}


# --- Section 5: the GET report answers ---------------------------------------------------------------------


def test_simple_get_answer() -> None:
    text = (GMS / "get_simple.json").read_text()
    items = normalise(text)
    # `clicks` (link clicks, Section 8 #23) has no place in a delivery report: it stays in the raw text.
    assert [item.report for item in items] == [
        gms_report(text.strip(), parts_total=1, parts_delivered=1, **SMS_DELIVERED)
    ]


def test_simple_get_answer_of_a_template_viber_message() -> None:
    text = (GMS / "get_simple_viber_template.json").read_text()
    assert [item.report for item in normalise(text)] == [gms_report(text.strip(), **VIBER_TEMPLATE_DELIVERED)]


def test_advanced_get_answer_gives_one_report_per_channel_attempt() -> None:
    text = (GMS / "get_advanced.json").read_text()
    items = normalise(text)
    attempts = json.loads(text)["reports"]

    assert [item.index for item in items] == [0, 1]
    assert [item.rejection for item in items] == [None, None]
    # Each item's text is its element of `reports`, byte for byte.
    assert [json.loads(item.raw) for item in items] == attempts
    assert all(item.raw in text for item in items)
    assert [item.report for item in items] == [
        # The Viber attempt: 3/35/35015, "SMS expired" in the code table (also shown with viber).
        gms_report(
            items[0].raw,
            channel=Channel.CHANNEL_VIBER,
            status=S.DELIVERY_STATUS_EXPIRED,
            final=True,
            raw=RawStatus(gms=GmsStatusCodes(status=3, substatus=35, hyber_status=35015, sent_via="viber")),
        ),
        # The SMS attempt that delivered it (`delivered_via`: "sms").
        gms_report(items[1].raw, parts_total=1, parts_delivered=1, **SMS_DELIVERED),
    ]


def test_advanced_get_answer_makes_delivered_via_the_message_channel_in_any_order() -> None:
    reports = [item.report for item in normalise((GMS / "get_advanced.json").read_text())]
    for order in itertools.permutations(reports):
        state = None
        for report in order:
            assert report is not None
            state = merge(state, report)
        assert state is not None
        assert (state.report.channel, state.report.status) == (
            Channel.CHANNEL_SMS,
            S.DELIVERY_STATUS_DELIVERED,
        )


def test_advanced_get_answer_of_a_template_viber_message() -> None:
    text = (GMS / "get_advanced_viber_template.json").read_text()
    items = normalise(text)
    assert [item.report for item in items] == [gms_report(items[0].raw, **VIBER_TEMPLATE_DELIVERED)]


def test_an_attempt_without_its_channel_takes_delivered_via() -> None:
    payload = json.dumps(
        {
            "reports": [
                {"message_id": "m-1", "status": 2},
                {"message_id": "m-1", "status": 3, "last_partner": "sms"},
            ]
        }
        | {"delivered_via": "viber"}
    )
    channels = [item.report.channel for item in normalise(payload) if item.report]
    assert channels == [Channel.CHANNEL_VIBER, Channel.CHANNEL_SMS]


def test_advanced_get_answer_with_no_attempt_yet_gives_no_items() -> None:
    assert normalise('{"reports": [], "started": false, "processing": true}') == []


def test_delivered_via_must_be_text() -> None:
    with pytest.raises(PayloadError) as raised:
        normalise('{"reports": [], "delivered_via": 1}')
    assert raised.value.rejection == Rejection(
        "delivered_via", ErrorReason.WRONG_TYPE, "delivered_via must be a string"
    )


# --- Section 3: campaign status ----------------------------------------------------------------------------


def test_campaign_status_items_with_and_without_status() -> None:
    text = (GMS / "campaign_status.json").read_text()
    items = normalise(text)

    assert [item.rejection for item in items] == [None, None]
    assert [json.loads(item.raw) for item in items] == json.loads(text)["messages"]
    expired = DeliveryReport(
        source=Source.SOURCE_GMS,
        message_id="e5ea7286-6849-52d7-9e1b-8719b736283e",
        reference="AD-6640-7007",
        recipient="+380962222222",
        # error_code 35015, "SMS expired", with no status: EXPIRED by the code table; no channel is named.
        status=S.DELIVERY_STATUS_EXPIRED,
        final=True,
        event_time=Timestamp(seconds=1477417299),
        received_time=RECEIVED,
        parts_total=1,
        error=DeliveryError(code=35015, description="SMS expired"),
        raw=RawStatus(gms=GmsStatusCodes(error_code=35015)),
        raw_payload=items[0].raw,
    )
    delivered = gms_report(
        items[1].raw,
        status=S.DELIVERY_STATUS_DELIVERED,
        final=True,
        parts_total=1,
        parts_delivered=1,
        raw=RawStatus(
            gms=GmsStatusCodes(status=2, substatus=23, hyber_status=23011, status_text="SMS delivered")
        ),
    )
    assert [item.report for item in items] == [expired, delivered]


def test_campaign_item_whose_error_code_maps_to_nothing_is_rejected_naming_status() -> None:
    payload = '{"messages": [{"message_id": "m-1", "error_code": 99999, "error_text": "new"}]}'
    [item] = normalise(payload)
    assert item.rejection == Rejection(
        "messages[0].status",
        ErrorReason.MISSING_FIELD,
        "messages[0].status is required (or, in campaign status, an error_code the code table maps)",
    )


# --- the XML callback ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("format", [Format.FORMAT_UNSPECIFIED, Format.FORMAT_GMS])
def test_xml_callback(format: Format.ValueType) -> None:
    text = (GMS / "callback.xml").read_text()
    items = normalise(text, format)
    # The XML example carries `delivered_sms_parts` but not `total_sms_parts`.
    assert [item.report for item in items] == [gms_report(text.strip(), parts_delivered=1, **SMS_DELIVERED)]
    assert items[0].format == Format.FORMAT_GMS


def test_xml_callback_is_run_again_on_its_own() -> None:
    text = (GMS / "callback.xml").read_text().strip()
    assert single_item_payload(text, Format.FORMAT_GMS) == text
    assert single_item_payload('{"message_id": "m"}', Format.FORMAT_GMS) == '[{"message_id": "m"}]'
    assert (
        single_item_payload('{"messageId": "m"}', Format.FORMAT_SENT_SMS_REPORT)
        == '{"results":[{"messageId": "m"}]}'
    )


@pytest.mark.parametrize(
    ("xml", "rejection"),
    [
        (
            "<DeliveryReport><status>2</status></DeliveryReport>",
            Rejection("message_id", ErrorReason.MISSING_FIELD, "message_id is required"),
        ),
        (
            "<DeliveryReport><message_id>m</message_id><status>two</status></DeliveryReport>",
            Rejection("status", ErrorReason.WRONG_TYPE, "status must be an integer, not a str"),
        ),
        (
            "<DeliveryReport><message_id>m</message_id><status><code>2</code></status></DeliveryReport>",
            Rejection("status", ErrorReason.WRONG_TYPE, "status must be an integer, not an object"),
        ),
        (
            "<DeliveryReport><message_id>a</message_id><message_id>b</message_id><status>2</status></DeliveryReport>",
            Rejection("message_id", ErrorReason.WRONG_TYPE, "message_id must be a string, not an array"),
        ),
    ],
)
def test_xml_item_rejections_name_the_field(xml: str, rejection: Rejection) -> None:
    [item] = normalise(xml)
    assert item.rejection == rejection
    assert item.raw == xml


@pytest.mark.parametrize(
    ("xml", "reason", "words"),
    [
        ("<DeliveryReport><status>2</DeliveryReport>", "INVALID_XML", "mismatched tag: line 1 column"),
        (
            "<Report><status>2</status></Report>",
            "UNKNOWN_FORMAT",
            "GMS <DeliveryReport> report, not <Report>",
        ),
        (
            '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><DeliveryReport>&a;</DeliveryReport>',
            "INVALID_XML",
            "a document type declaration is not accepted",
        ),
        ("<DeliveryReport>&undefined;</DeliveryReport>", "INVALID_XML", "undefined entity"),
    ],
)
def test_unusable_xml_is_a_payload_error(xml: str, reason: str, words: str) -> None:
    with pytest.raises(PayloadError) as raised:
        normalise(xml)
    assert raised.value.rejection.field == ""
    assert ErrorReason.Name(raised.value.rejection.reason) == reason
    assert words in raised.value.rejection.description


def test_xml_is_not_read_as_a_sent_sms_report() -> None:
    with pytest.raises(PayloadError) as raised:
        normalise((GMS / "callback.xml").read_text(), Format.FORMAT_SENT_SMS_REPORT)
    assert raised.value.rejection == Rejection(
        "", ErrorReason.WRONG_TYPE, "a SentSMSReport payload must be JSON, not XML"
    )


# --- detection --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["get_simple.json", "get_advanced.json", "get_advanced_viber_template.json", "campaign_status.json"],
)
def test_every_json_shape_is_detected_as_gms(name: str) -> None:
    text = (GMS / name).read_text()
    assert detect_format(decode(text)) == Format.FORMAT_GMS
    assert normalise(text) == normalise(text, Format.FORMAT_GMS)


@pytest.mark.parametrize("text", ['{"reports": {}}', '{"messages": "none"}', '{"channels": []}'])
def test_an_envelope_needs_its_array(text: str) -> None:
    with pytest.raises(PayloadError) as raised:
        detect_format(decode(text))
    assert raised.value.rejection.reason == ErrorReason.UNKNOWN_FORMAT
