"""SentSMSReport (Infobip-style) delivery and seen reports to DeliveryReports.

Input: `{"results": [...]}`, pulled (`GET /sms/1/reports`, and the MMS, OMNI
and Messages API report endpoints) or pushed to a webhook, in each shape
Infobip documents:
- the SMS v1 report (`from`, `smsCount`, top-level `entityId` and
  `applicationId`) and the newer one (`sender`, `messageCount`, `platform`);
  MMS v1 reports count parts in `mmsCount`; a sent time spelled `sendAt` is
  read as `sentAt`; `mccMnc` comes as text or as a number;
- the Messages API report: the recipient in `destination`, an `event`
  (DELIVERY or SEEN) and a `channel`;
- seen reports: `seenAt` and no `status`. In the per-channel seen reports
  (WhatsApp, Viber, RCS) `from` is the end user who saw the message and `to`
  the business sender (Infobip's WhatsAppWebhookSeenReport, ViberSeenReport and
  RcsSeenReport models). The older OMNI seen report has no `from`: its `to` is
  the recipient, the same as in the message's delivery report. The Messages
  API seen report keeps `destination` and `sender`. SMS and MMS have no seen
  reports.

Channel: a `channel` field wins (a name dlrhub has no value for gives
CHANNEL_UNSPECIFIED, its name kept in the raw codes); else `mmsCount` says
MMS; else the channel the endpoint serves (`default_channel`: SMS unless the
transport says otherwise).

Status: by (groupId, id), else by groupName, through the code table; a status
object that maps by neither is UNSPECIFIED with its raw fields kept.
Required: `messageId`, and `status` or `seenAt`.
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
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from dlrhub.normalise.codes import CodeTable
from dlrhub.normalise.document import Document
from dlrhub.normalise.fields import Fields, InvalidItem, read_item
from dlrhub.normalise.recipient import e164
from dlrhub.normalise.results import NormalisedItem, PayloadError, Rejection
from dlrhub.normalise.timestamps import from_text
from dlrhub.statuses import FINAL

FORMAT = Format.FORMAT_SENT_SMS_REPORT
FACTS = ("seen", "group_id", "id", "group_name")
SHIPPED_TABLE = "sent_sms_report_codes.json"

# The `channel` values Infobip lists for its reports (Messages API delivery and
# seen reports, RCS failover, Zalo, OMNI), upper-cased.
CHANNELS: dict[str, Channel.ValueType] = {
    "SMS": Channel.CHANNEL_SMS,
    "MMS": Channel.CHANNEL_MMS,
    "VIBER": Channel.CHANNEL_VIBER,
    "VIBER_BM": Channel.CHANNEL_VIBER,
    "VIBER_BOT": Channel.CHANNEL_VIBER,
    "WHATSAPP": Channel.CHANNEL_WHATSAPP,
    "PUSH": Channel.CHANNEL_PUSH,
    "RCS": Channel.CHANNEL_RCS,
    "APPLE_MB": Channel.CHANNEL_APPLE_MESSAGES,
    "INSTAGRAM_DM": Channel.CHANNEL_INSTAGRAM,
    "LINE_ON": Channel.CHANNEL_LINE,
    "MESSENGER": Channel.CHANNEL_MESSENGER,
    "KAKAO": Channel.CHANNEL_KAKAO,
    "ZALO": Channel.CHANNEL_ZALO,
    "ZALO_NOTIFICATION_SERVICE": Channel.CHANNEL_ZALO,
    "VOICE": Channel.CHANNEL_VOICE,
    "TELEGRAM": Channel.CHANNEL_TELEGRAM,
}
# Enum values looked up once: attribute access on an enum wrapper is slow per report.
_SOURCE = Source.SOURCE_SENT_SMS_REPORT
_MMS = Channel.CHANNEL_MMS
_NO_CHANNEL = Channel.CHANNEL_UNSPECIFIED
# What OMNI reports put in `mccMnc` when they have none (Infobip's WhatsApp pull example).
_NO_MCC_MNC = "null"


def normalise(
    document: Document, table: CodeTable, received: Timestamp, default_channel: Channel.ValueType
) -> list[NormalisedItem]:
    """Every report of a `{"results": [...]}` payload, or why each item was rejected."""
    body = document.value
    if not isinstance(body, dict):
        raise PayloadError(
            Rejection(
                "", ErrorReason.WRONG_TYPE, 'a SentSMSReport payload must be an object {"results": [...]}'
            )
        )
    results = body.get("results")
    if not isinstance(results, list):
        reason = ErrorReason.MISSING_FIELD if results is None else ErrorReason.WRONG_TYPE
        raise PayloadError(Rejection("results", reason, "results must be an array of reports"))
    build = functools.partial(_report, table=table, default_channel=default_channel)
    return [
        read_item(index, value, text, f"results[{index}]", FORMAT, build, received)
        for index, (value, text) in enumerate(zip(results, document.member_elements["results"], strict=True))
    ]


def _report(item: Fields, table: CodeTable, default_channel: Channel.ValueType) -> DeliveryReport:
    message_id = item.required_text("messageId")
    status = item.object("status")
    seen_at = item.text("seenAt")
    if status is None and seen_at is None:
        path = item.path_of("status")
        raise InvalidItem(
            Rejection(path, ErrorReason.MISSING_FIELD, f"{path} is required (or seenAt, for a seen report)")
        )
    platform = item.object("platform")
    mcc_mnc = item.address("mccMnc")  # text, or a number in Messages API and MMS reports
    destination = item.address("destination")
    if (
        status is None and destination is None and item.has("from")
    ):  # per-channel: `from` saw it, `to` sent it
        recipient, sender = item.address("from"), item.text("sender") or item.address("to")
    else:
        recipient, sender = destination or item.address("to"), item.text("sender") or item.text("from")
    mms_count = item.integer("mmsCount", bits=32)
    channel_name = item.text("channel")
    if channel_name is not None:
        channel = CHANNELS.get(channel_name.upper(), _NO_CHANNEL)
    else:
        channel = default_channel if mms_count is None else _MMS

    report = DeliveryReport(
        source=_SOURCE,
        message_id=message_id,
        bulk_id=item.text("bulkId") or "",
        reference=item.text("callbackData") or "",
        recipient=e164(recipient or ""),
        sender=sender or "",
        channel=channel,
        mcc_mnc="" if mcc_mnc == _NO_MCC_MNC else mcc_mnc or "",
        entity_id=item.text("entityId") or _text(platform, "entityId"),
        application_id=item.text("applicationId") or _text(platform, "applicationId"),
        parts_total=_first_integer(item, "smsCount", "messageCount", "mmsCount"),
    )
    unknown_channel = channel_name if channel_name and channel == _NO_CHANNEL else ""
    if status is None:
        raw = SentSmsReportStatusCodes(seen=True, channel_name=unknown_channel)
        key: tuple[bool, int | None, int | None, str | None] = (True, None, None, None)
    else:
        group_id = status.integer("groupId", bits=32)
        status_id = status.integer("id", bits=32)
        group_name = status.text("groupName")
        raw = SentSmsReportStatusCodes(
            group_id=group_id or 0,
            group_name=group_name or "",
            id=status_id or 0,
            name=status.text("name") or "",
            description=status.text("description") or "",
            action=status.text("action") or "",
            channel_name=unknown_channel,
        )
        key = (False, group_id, status_id, group_name.upper() if group_name else None)
    report.raw.CopyFrom(RawStatus(sent_sms_report=raw))
    report.status = table.status(key)
    report.final = report.status in FINAL

    sent_at = _time(item, "sentAt") or _time(item, "sendAt")
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
        group_id = error.integer("groupId", bits=32) or 0
        error_id = error.integer("id", bits=32) or 0
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
        value = item.integer(key, bits=32)
        if value is not None:
            return value
    return None


def _time(item: Fields, key: str) -> Timestamp | None:
    text = item.text(key)
    return None if text is None else from_text(text, item.path_of(key))
