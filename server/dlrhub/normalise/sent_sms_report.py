"""SentSMSReport (Infobip-style) delivery and seen reports to DeliveryReports.

Input: `{"results": [...]}`, as returned by `GET /sms/1/reports` or pushed to
a webhook. Both spellings are accepted: `from`/`sender`,
`smsCount`/`messageCount`, `entityId`/`applicationId` at the top or inside
`platform`. A seen report has `seenAt` and no `status`. Required:
`messageId`, and `status` or `seenAt`.
"""

from __future__ import annotations

import functools

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import (
    Channel,
    DeliveryError,
    DeliveryReport,
    Price,
    RawStatus,
    SentSmsReportStatusCodes,
    Source,
)
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.normalise.codes import CodeTable
from dlrhub.normalise.document import Document
from dlrhub.normalise.fields import Fields, InvalidItem, read_item
from dlrhub.normalise.recipient import e164
from dlrhub.normalise.results import NormalisedItem, PayloadError, Rejection
from dlrhub.normalise.timestamps import from_text
from dlrhub.statuses import FINAL

FORMAT = Format.FORMAT_SENT_SMS_REPORT
FACTS = ("seen", "group_id", "id")
SHIPPED_TABLE = "sent_sms_report_codes.json"

# A `channel` field, where a newer payload has one, wins over the SMS default.
CHANNELS: dict[str, Channel.ValueType] = {
    "SMS": Channel.CHANNEL_SMS,
    "VIBER": Channel.CHANNEL_VIBER,
    "VIBER_BM": Channel.CHANNEL_VIBER,
    "WHATSAPP": Channel.CHANNEL_WHATSAPP,
    "PUSH": Channel.CHANNEL_PUSH,
}
# Enum values looked up once: attribute access on an enum wrapper is slow per report.
_SOURCE = Source.SOURCE_SENT_SMS_REPORT
_SMS = Channel.CHANNEL_SMS
_NO_CHANNEL = Channel.CHANNEL_UNSPECIFIED


def normalise(document: Document, table: CodeTable, received: Timestamp) -> list[NormalisedItem]:
    """Every report of a `{"results": [...]}` payload, or why each item was rejected."""
    body = document.value
    if not isinstance(body, dict):
        raise PayloadError(
            Rejection("", "WRONG_TYPE", 'a SentSMSReport payload must be an object {"results": [...]}')
        )
    results = body.get("results")
    if not isinstance(results, list):
        reason = "MISSING_FIELD" if results is None else "WRONG_TYPE"
        raise PayloadError(Rejection("results", reason, "results must be an array of reports"))
    build = functools.partial(_report, table=table)
    return [
        read_item(index, value, text, f"results[{index}]", FORMAT, build, received)
        for index, (value, text) in enumerate(zip(results, document.member_elements["results"], strict=True))
    ]


def _report(item: Fields, table: CodeTable) -> DeliveryReport:
    message_id = item.required_text("messageId")
    status = item.object("status")
    seen_at = item.text("seenAt")
    if status is None and seen_at is None:
        path = item.path_of("status")
        raise InvalidItem(
            Rejection(path, "MISSING_FIELD", f"{path} is required (or seenAt, for a seen report)")
        )
    platform = item.object("platform")
    channel_name = item.text("channel")

    report = DeliveryReport(
        source=_SOURCE,
        message_id=message_id,
        bulk_id=item.text("bulkId") or "",
        reference=item.text("callbackData") or "",
        recipient=e164(item.address("to") or ""),
        sender=item.text("sender") or item.text("from") or "",
        channel=CHANNELS.get(channel_name.upper(), _NO_CHANNEL) if channel_name else _SMS,
        mcc_mnc=item.text("mccMnc") or "",
        entity_id=item.text("entityId") or _text(platform, "entityId"),
        application_id=item.text("applicationId") or _text(platform, "applicationId"),
        parts_total=_first_integer(item, "smsCount", "messageCount"),
    )
    if status is None:
        raw = SentSmsReportStatusCodes(seen=True)
        key: tuple[bool, int | None, int | None] = (True, None, None)
    else:
        group_id = status.required_integer("groupId")
        status_id = status.required_integer("id")
        raw = SentSmsReportStatusCodes(
            group_id=group_id,
            group_name=status.text("groupName") or "",
            id=status_id,
            name=status.text("name") or "",
            description=status.text("description") or "",
            action=status.text("action") or "",
        )
        key = (False, group_id, status_id)
    report.raw.CopyFrom(RawStatus(sent_sms_report=raw))
    report.status = table.status(key)
    report.final = report.status in FINAL

    sent_at = _time(item, "sentAt")
    if sent_at is not None:
        report.sent_time.CopyFrom(sent_at)
    event_time = _time(item, "doneAt") or _time(item, "seenAt") or sent_at
    if event_time is not None:
        report.event_time.CopyFrom(event_time)

    price = item.object("price")
    if price is not None:
        amount = price.decimal("pricePerMessage")
        if amount is not None:
            report.price.CopyFrom(Price(amount=amount, currency=price.text("currency") or ""))

    error = item.object("error")
    if error is not None:
        group_id = error.integer("groupId") or 0
        error_id = error.integer("id") or 0
        if group_id or error_id:  # group 0 / id 0 is NO_ERROR: no error at all
            report.error.CopyFrom(
                DeliveryError(
                    code=error_id,
                    name=error.text("name") or "",
                    group_id=group_id,
                    group_name=error.text("groupName") or "",
                    description=error.text("description") or "",
                    permanent=error.boolean("permanent"),
                )
            )
    return report


def _text(fields: Fields | None, key: str) -> str:
    return (fields.text(key) if fields is not None else None) or ""


def _first_integer(item: Fields, *keys: str) -> int | None:
    for key in keys:
        value = item.integer(key)
        if value is not None:
            return value
    return None


def _time(item: Fields, key: str) -> Timestamp | None:
    text = item.text(key)
    return None if text is None else from_text(text, item.path_of(key))
