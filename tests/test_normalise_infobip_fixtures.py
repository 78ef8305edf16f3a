"""Infobip-style reports beyond the SMS v1 shape, from Infobip's SDK tests and documentation.

Each fixture is a published payload (sources in tests/fixtures/providers/infobip/SOURCES.md); the
expected reports are written from Infobip's field descriptions (its generated SDK models and the
webhook pages), never from dlrhub's output.
"""

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
from dlrhub.merge import merge
from dlrhub.normalise import NormalisedItem
from tests.normalising import FIXTURES, NORMALISER, RECEIVED, ts

S = DeliveryStatus
C = Channel
INFOBIP = FIXTURES / "providers" / "infobip"
DELIVERED_TO_HANDSET = SentSmsReportStatusCodes(
    group_id=3,
    group_name="DELIVERED",
    id=5,
    name="DELIVERED_TO_HANDSET",
    description="Message delivered to handset",
)
SEEN = SentSmsReportStatusCodes(seen=True)


def normalise(
    payload: str,
    default_channel: Channel.ValueType = C.CHANNEL_SMS,
    format: Format.ValueType = Format.FORMAT_UNSPECIFIED,
) -> list[NormalisedItem]:
    return NORMALISER.normalise(payload, format, RECEIVED, default_channel=default_channel)


def reports_of(name: str, default_channel: Channel.ValueType = C.CHANNEL_SMS) -> list[DeliveryReport]:
    """The reports of a fixture, each checked to carry its own element of `results` as its text."""
    text = (INFOBIP / name).read_text()
    items = normalise(text, default_channel)
    assert [item.rejection for item in items] == [None] * len(items)
    assert [json.loads(item.raw) for item in items] == json.loads(text)["results"]
    reports = [item.report for item in items if item.report is not None]
    assert all(report.raw_payload in text for report in reports)
    return reports


def report(raw_payload: str, /, **fields: Any) -> DeliveryReport:
    return DeliveryReport(
        source=Source.SOURCE_SENT_SMS_REPORT, received_time=RECEIVED, raw_payload=raw_payload, **fields
    )


def delivered(raw: SentSmsReportStatusCodes = DELIVERED_TO_HANDSET) -> dict[str, Any]:
    return {"status": S.DELIVERY_STATUS_DELIVERED, "final": True, "raw": RawStatus(sent_sms_report=raw)}


def seen() -> dict[str, Any]:
    return {"status": S.DELIVERY_STATUS_SEEN, "final": True, "raw": RawStatus(sent_sms_report=SEEN)}


# --- SMS v3 and the Messages API ---------------------------------------------------------------------------


def test_sms_v3_webhook() -> None:
    [got] = reports_of("sms_v3_webhook.json")
    assert got == report(
        got.raw_payload,
        message_id="MESSAGE-ID-123-xyz",
        bulk_id="BULK-ID-123-xyz",
        recipient="+41793026727",
        sender="InfoSMS",
        channel=C.CHANNEL_SMS,
        # "2023-08-01T16:10:00+05:30"
        event_time=ts("2023-08-01T10:40:00Z"),
        sent_time=ts("2023-08-01T10:40:00Z"),
        parts_total=1,
        price=Price(amount="0.01", currency="EUR"),
        entity_id="promotional-traffic-entity",
        application_id="marketing-automation-application",
        **delivered(),
    )


def test_messages_api_delivery_report() -> None:
    [got] = reports_of("messages_api_delivery.json")
    assert got == report(
        got.raw_payload,
        message_id="ABEGVUGWh3gEAgo-sLTvmQCS5kwjhsy",
        bulk_id="1688025180464000013",
        # `destination`: "Message destination address"; `sender`: "The sender ID".
        recipient="+41793026727",
        sender="senderNumber",
        channel=C.CHANNEL_WHATSAPP,
        event_time=ts("2024-02-06T17:18:29.797Z"),
        sent_time=ts("2024-02-06T14:18:29.797Z"),
        parts_total=1,
        entity_id="my-entity-id",
        application_id="my-application-id",
        **delivered(),
    )


def test_messages_api_seen_report_keeps_destination_and_sender() -> None:
    [got] = reports_of("messages_api_seen.json")
    assert got == report(
        got.raw_payload,
        message_id="ABEGVUGWh3gEAgo-sLTvmQCS5kwjhsy",
        bulk_id="1688025180464000013",
        reference="reference-callback-data-from-outbound-message",
        recipient="+41793026727",
        sender="senderNumber",
        channel=C.CHANNEL_WHATSAPP,
        event_time=ts("2024-02-06T14:28:29.797Z"),
        sent_time=ts("2024-02-06T14:18:29.797Z"),
        entity_id="my-entity-id",
        application_id="my-application-id",
        **seen(),
    )


# --- per-channel webhooks: the body does not name its channel; the endpoint does ---------------------------


def test_viber_delivery_report_on_an_endpoint_that_serves_viber() -> None:
    [got] = reports_of("viber_delivery.json", C.CHANNEL_VIBER)
    assert got == report(
        got.raw_payload,
        message_id="2250be2d4219-3af1-78856-aabe-1362af1edfd2",
        bulk_id="a28dd97c-2222-4fcf-99f1-0b557ed381da",
        reference="Callback data",
        recipient="+441134960001",
        sender="441134960000",
        channel=C.CHANNEL_VIBER,
        mcc_mnc="22801",
        event_time=ts("2023-02-03T00:01:01Z"),
        sent_time=ts("2023-02-01T23:00:00Z"),
        parts_total=1,
        price=Price(amount="0.15", currency="EUR"),
        entity_id="promotional-traffic-entity",
        application_id="marketing-automation-application",
        **delivered(),
    )


def test_a_body_without_channel_is_sms_unless_the_endpoint_says_otherwise() -> None:
    # docs/normalisation.md §5: the `channel` field, else the endpoint's channel, else SMS.
    assert [got.channel for got in reports_of("viber_delivery.json")] == [C.CHANNEL_SMS]
    assert [got.channel for got in reports_of("zalo_delivery.json", C.CHANNEL_VIBER)] == [C.CHANNEL_ZALO] * 2


def test_viber_seen_report_from_is_the_user_to_is_the_viber_sender() -> None:
    # ViberSeenReport: `from` "Number which sent the message" (the seen event), `to` "Sender provided
    # during the activation process".
    [got] = reports_of("viber_seen.json", C.CHANNEL_VIBER)
    assert got == report(
        got.raw_payload,
        message_id="1215f543ab19-345f-adbd-12ad31451ed25f35",
        recipient="+385919998888",
        sender="41793026731",
        channel=C.CHANNEL_VIBER,
        event_time=ts("2023-04-05T11:22:10.251Z"),
        sent_time=ts("2023-04-05T11:21:57.793Z"),
        entity_id="example-entity-id",
        application_id="example-application-id",
        **seen(),
    )


def test_whatsapp_delivery_report() -> None:
    [got] = reports_of("whatsapp_delivery.json", C.CHANNEL_WHATSAPP)
    assert got == report(
        got.raw_payload,
        message_id="fb469d73-d362-463f-b30f-1e959b53badc",
        recipient="+41793026731",
        channel=C.CHANNEL_WHATSAPP,
        event_time=ts("2019-04-09T19:01:56.494Z"),
        sent_time=ts("2019-04-09T19:00:58.647Z"),
        parts_total=1,
        price=Price(amount="0.21", currency="BRL"),
        **delivered(),
    )


def test_whatsapp_seen_report_to_is_the_business_number() -> None:
    # WhatsAppWebhookSeenReport: `to` is the "Registered WhatsApp business number".
    [got] = reports_of("whatsapp_seen.json", C.CHANNEL_WHATSAPP)
    assert got == report(
        got.raw_payload,
        message_id="1215f543ab19-345f-adbd-12ad31451ed25f35",
        recipient="+385919998888",
        sender="41793026731",
        channel=C.CHANNEL_WHATSAPP,
        event_time=ts("2018-12-12T11:21:58.251Z"),
        sent_time=ts("2018-12-12T11:21:57.793Z"),
        entity_id="example-entity-id",
        application_id="example-application-id",
        **seen(),
    )


def test_older_whatsapp_seen_report_has_only_the_recipient() -> None:
    # No `from`: on the same page, the delivery report of the same message gives the same `to`.
    [got] = reports_of("omni_whatsapp_seen.json", C.CHANNEL_WHATSAPP)
    assert got == report(
        got.raw_payload,
        message_id="1215f543ab19-345f-adbd-12ad31451ed25f35",
        recipient="+41793026731",
        channel=C.CHANNEL_WHATSAPP,
        event_time=ts("2018-12-12T11:21:58.251Z"),
        sent_time=ts("2018-12-12T11:21:57.793Z"),
        **seen(),
    )


def test_seen_report_merged_after_its_delivery_report_keeps_the_recipient() -> None:
    state = None
    for got in reports_of("omni_whatsapp_pull.json") + reports_of(
        "omni_whatsapp_seen.json", C.CHANNEL_WHATSAPP
    ):
        state = merge(state, got)
    assert state is not None
    merged = state.report
    assert (merged.status, merged.channel, merged.recipient) == (
        S.DELIVERY_STATUS_SEEN,
        C.CHANNEL_WHATSAPP,
        "+41793026731",
    )
    assert (merged.parts_total, merged.price.amount) == (1, "0")  # from the delivery report


def test_apple_messages_for_business_report_keeps_its_opaque_addresses() -> None:
    [got] = reports_of("apple_mb_delivery.json", C.CHANNEL_APPLE_MESSAGES)
    sender = json.loads(got.raw_payload)["sender"]
    assert sender.startswith("urn:mbid:AQAAY9Jnpv")
    assert got == report(
        got.raw_payload,
        message_id="1688025180464000014",
        bulk_id="1688025180464000013",
        recipient="a42fa0e0-1d5f-44f6-a321-0e40300f7712",
        sender=sender,
        channel=C.CHANNEL_APPLE_MESSAGES,
        mcc_mnc="22801",
        event_time=ts("2023-09-26T10:52:15.799Z"),
        sent_time=ts("2023-09-26T10:52:15.457Z"),
        parts_total=1,
        price=Price(amount="0.15", currency="EUR"),
        entity_id="promotional-traffic-entity",
        application_id="marketing-automation-application",
        **delivered(),
    )


# --- a channel field: OMNI, an integrator, Zalo --------------------------------------------------------


def test_omni_pull_with_channel_and_no_mcc_mnc() -> None:
    [got] = reports_of("omni_whatsapp_pull.json")
    assert got == report(
        got.raw_payload,
        message_id="1215f543ab19-345f-adbd-12ad31451ed25f35",
        recipient="+41793026731",
        channel=C.CHANNEL_WHATSAPP,
        # "mccMnc": "null" is the provider saying it has none.
        event_time=ts("2018-12-12T11:21:58.771Z"),
        sent_time=ts("2018-12-12T11:21:57.793Z"),
        parts_total=1,
        price=Price(amount="0", currency="EUR"),
        **delivered(),
    )


def test_integrator_forwarded_whatsapp_report() -> None:
    [got] = reports_of("enghouse_whatsapp_delivery.json")
    assert got == report(
        got.raw_payload,
        message_id="fb469d73-d362-463f-b30f-1e959b53badc",
        recipient="+41793026731",
        channel=C.CHANNEL_WHATSAPP,
        event_time=ts("2019-04-09T19:01:56.494Z"),
        sent_time=ts("2019-04-09T19:00:58.647Z"),
        **delivered(),
    )


def test_zalo_reports_get_the_zalo_channel() -> None:
    got = reports_of("zalo_delivery.json")
    common: dict[str, Any] = {
        "bulk_id": "BULK-ID-123-xyz",
        "channel": C.CHANNEL_ZALO,
        "parts_total": 1,
        "price": Price(amount="0.01", currency="EUR"),
        "entity_id": "my-entity-id",
        "application_id": "my-application-id",
        **delivered(),
    }
    assert got == [
        report(
            got[0].raw_payload,
            message_id="45db39c3-7822-4e72-a3ec-c87442c0ffz9",
            recipient="+41793026727",
            event_time=ts("2019-11-09T16:00:00Z"),
            sent_time=ts("2019-11-09T16:00:00Z"),
            **common,
        ),
        report(
            got[1].raw_payload,
            message_id="12db39c3-7822-4e72-a3ec-c87442c0ffc5",
            recipient="+41793026834",
            event_time=ts("2019-11-09T17:00:00Z"),
            sent_time=ts("2019-11-09T17:00:00Z"),
            **common,
        ),
    ]


# --- MMS --------------------------------------------------------------------------------------------------


def test_mms_webhook_with_a_numeric_mcc_mnc() -> None:
    got = reports_of("mms_webhook.json", C.CHANNEL_MMS)
    common: dict[str, Any] = {
        "bulk_id": "BULK-ID-123-xyz",
        "reference": "callbackData",
        "channel": C.CHANNEL_MMS,
        "mcc_mnc": "90134",
        "parts_total": 1,
        "price": Price(amount="0.01", currency="EUR"),
        "entity_id": "entityId",
        "application_id": "applicationId",
        **delivered(),
    }
    assert got == [
        report(
            got[0].raw_payload,
            message_id="MESSAGE-ID-123-xyz",
            recipient="+41793026727",
            event_time=ts("2019-11-09T16:00:00Z"),
            sent_time=ts("2019-11-09T16:00:00Z"),
            **common,
        ),
        report(
            got[1].raw_payload,
            message_id="12db39c3-7822-4e72-a3ec-c87442c0ffc5",
            recipient="+41793026834",
            event_time=ts("2019-11-09T17:00:00Z"),
            sent_time=ts("2019-11-09T17:00:00Z"),
            **common,
        ),
    ]


@pytest.mark.parametrize("default_channel", [C.CHANNEL_SMS, C.CHANNEL_MMS])
def test_mms_v1_pull_with_mms_count_and_an_error_without_permanent(
    default_channel: Channel.ValueType,
) -> None:
    [got] = reports_of("mms_v1_pull.json", default_channel)
    assert got == report(
        got.raw_payload,
        message_id="abc-123",
        recipient="+38598331223",
        sender="38599873331",
        # `mmsCount` says MMS, whatever the endpoint.
        channel=C.CHANNEL_MMS,
        mcc_mnc="28988",
        status=S.DELIVERY_STATUS_ACCEPTED,
        final=False,
        event_time=ts("2022-04-02T15:46:32.931Z"),
        sent_time=ts("2022-04-02T15:44:12.351Z"),
        parts_total=1,
        price=Price(amount="4", currency="HRK"),
        error=DeliveryError(
            code=1, name="The Name", group_id=1, group_name="Group 1", description="Some error"
        ),
        raw=RawStatus(
            sent_sms_report=SentSmsReportStatusCodes(
                group_id=1,
                group_name="PENDING",
                id=26,
                name="PENDING_ACCEPTED",
                description="Message accepted, pending for delivery.",
            )
        ),
    )
    # No `permanent`: the provider does not say whether a retry can succeed.
    assert not got.error.HasField("permanent")


# --- statuses by group name, unknown statuses and channels, spellings ------------------------------------
# Shapes from issue #16 and integrators' forwarders (e.g. {"status": {"groupName": "DELIVERED"}}), one field
# at a time; not provider fixtures.


def one(fields: dict[str, Any], default_channel: Channel.ValueType = C.CHANNEL_SMS) -> DeliveryReport:
    [item] = normalise(json.dumps({"results": [{"messageId": "M-1", **fields}]}), default_channel)
    assert item.rejection is None, item.rejection
    assert item.report is not None
    return item.report


@pytest.mark.parametrize(
    ("group_name", "status"),
    [
        ("PENDING", S.DELIVERY_STATUS_ACCEPTED),
        ("ACCEPTED", S.DELIVERY_STATUS_ACCEPTED),
        ("UNDELIVERABLE", S.DELIVERY_STATUS_UNDELIVERED),
        ("DELIVERED", S.DELIVERY_STATUS_DELIVERED),
        ("delivered", S.DELIVERY_STATUS_DELIVERED),
        ("EXPIRED", S.DELIVERY_STATUS_EXPIRED),
        ("REJECTED", S.DELIVERY_STATUS_REJECTED),
    ],
)
def test_status_known_only_by_group_name_maps_by_name(
    group_name: str, status: DeliveryStatus.ValueType
) -> None:
    got = one({"status": {"groupName": group_name}})
    assert got.status == status
    assert got.raw.sent_sms_report == SentSmsReportStatusCodes(group_name=group_name)


def test_ids_win_over_the_group_name() -> None:
    # (3, 2) DELIVERED_TO_OPERATOR is SENT although its group is DELIVERED.
    assert one({"status": {"groupId": 3, "groupName": "DELIVERED", "id": 2}}).status == S.DELIVERY_STATUS_SENT
    # An unknown group id falls back to the name.
    assert (
        one({"status": {"groupId": 9, "groupName": "REJECTED", "id": 1}}).status == S.DELIVERY_STATUS_REJECTED
    )


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        ({}, SentSmsReportStatusCodes()),
        ({"id": 5}, SentSmsReportStatusCodes(id=5)),
        (
            {"name": "SOMETHING_NEW", "description": "new"},
            SentSmsReportStatusCodes(name="SOMETHING_NEW", description="new"),
        ),
        ({"groupName": "FUTURE", "id": 77}, SentSmsReportStatusCodes(group_name="FUTURE", id=77)),
    ],
)
def test_status_with_neither_known_id_nor_name_is_unspecified_and_kept(
    status: dict[str, Any], raw: SentSmsReportStatusCodes
) -> None:
    got = one({"status": status})
    assert (got.status, got.final) == (S.DELIVERY_STATUS_UNSPECIFIED, False)
    assert got.raw.sent_sms_report == raw


def test_unknown_channel_keeps_its_name() -> None:
    got = one({"status": {"groupId": 3, "id": 5}, "channel": "CARRIER_PIGEON"}, C.CHANNEL_VIBER)
    assert got.channel == C.CHANNEL_UNSPECIFIED
    assert got.raw.sent_sms_report.channel_name == "CARRIER_PIGEON"
    seen_report = one({"seenAt": "2024-01-01T00:00:00Z", "channel": "CARRIER_PIGEON"})
    assert seen_report.raw.sent_sms_report == SentSmsReportStatusCodes(
        seen=True, channel_name="CARRIER_PIGEON"
    )


def test_the_channel_field_wins_over_the_endpoint() -> None:
    assert (
        one({"status": {"groupId": 3, "id": 5}, "channel": "SMS"}, C.CHANNEL_WHATSAPP).channel
        == C.CHANNEL_SMS
    )
    assert one({"status": {"groupId": 3, "id": 5}}, C.CHANNEL_RCS).channel == C.CHANNEL_RCS


def test_sent_time_spelled_send_at() -> None:
    got = one({"status": {"groupId": 1, "id": 26}, "sendAt": "2024-03-01T09:15:00.250-0300"})
    assert got.sent_time == ts("2024-03-01T12:15:00.250Z")
    assert got.event_time == got.sent_time


@pytest.mark.parametrize(("value", "mcc_mnc"), [(22801, "22801"), ("22801", "22801"), ("null", "")])
def test_mcc_mnc_as_number_or_text(value: int | str, mcc_mnc: str) -> None:
    assert one({"status": {"groupId": 3, "id": 5}, "mccMnc": value}).mcc_mnc == mcc_mnc
