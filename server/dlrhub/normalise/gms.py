"""GMS ("Hyber") delivery reports to DeliveryReports.

Input: one report object, or a JSON array of them (a batch); the GET-report
spellings `phone_number` and `last_partner` / `delivered_via` are accepted
beside `number` and `sent_via`. `number` may be a JSON number or a string;
`time` is Unix epoch milliseconds. Required: `message_id` and `status`.
"""

from __future__ import annotations

import functools

from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import (
    Channel,
    DeliveryError,
    DeliveryReport,
    GmsStatusCodes,
    RawStatus,
    Source,
)
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.normalise.codes import CodeTable
from dlrhub.normalise.document import Document
from dlrhub.normalise.fields import Fields, read_item
from dlrhub.normalise.recipient import e164
from dlrhub.normalise.results import NormalisedItem
from dlrhub.normalise.timestamps import from_millis
from dlrhub.statuses import FINAL

FORMAT = Format.FORMAT_GMS
FACTS = ("status", "substatus", "hyber_status", "error_code", "sent_via")
SHIPPED_TABLE = "gms_codes.json"

CHANNELS: dict[str, Channel.ValueType] = {
    "sms": Channel.CHANNEL_SMS,
    "viber": Channel.CHANNEL_VIBER,
    "whatsapp": Channel.CHANNEL_WHATSAPP,
    "push": Channel.CHANNEL_PUSH,
}
# Enum values looked up once: attribute access on an enum wrapper is slow per report.
_SOURCE = Source.SOURCE_GMS
_NO_CHANNEL = Channel.CHANNEL_UNSPECIFIED


def normalise(document: Document, table: CodeTable, received: Timestamp) -> list[NormalisedItem]:
    """Every report of a GMS payload, or the reason each item was rejected."""
    build = functools.partial(_report, table=table)
    if isinstance(document.value, list):
        return [
            read_item(index, value, text, f"[{index}]", FORMAT, build, received)
            for index, (value, text) in enumerate(zip(document.value, document.elements, strict=True))
        ]
    return [read_item(0, document.value, document.text, "", FORMAT, build, received)]


def _report(item: Fields, table: CodeTable) -> DeliveryReport:
    message_id = item.required_text("message_id")
    status = item.required_integer("status")
    substatus = item.integer("substatus")
    hyber_status = item.integer("hyber_status")
    error_code = item.integer("error_code")
    sent_via = item.text("sent_via") or item.text("last_partner") or item.text("delivered_via") or ""
    channel_name = sent_via.lower()
    unified = table.status((status, substatus, hyber_status, error_code, channel_name))

    report = DeliveryReport(
        source=_SOURCE,
        message_id=message_id,
        reference=item.text("extra_id") or "",
        recipient=e164(item.address("number") or item.address("phone_number") or ""),
        channel=CHANNELS.get(channel_name, _NO_CHANNEL),
        status=unified,
        final=unified in FINAL,
        raw=RawStatus(
            gms=GmsStatusCodes(
                status=status,
                substatus=substatus,
                hyber_status=hyber_status,
                error_code=error_code,
                sent_via=sent_via,
                status_text=item.text("status_text") or "",
            )
        ),
        parts_total=item.integer("total_sms_parts"),
        parts_delivered=item.integer("delivered_sms_parts"),
        template_id=item.integer("matching_template_id"),
    )
    time_ms = item.integer("time")
    if time_ms is not None:
        report.event_time.CopyFrom(from_millis(time_ms, item.path_of("time")))
    error_text = item.text("error_text")
    if error_code is not None or error_text:
        report.error.CopyFrom(DeliveryError(code=error_code or 0, description=error_text or ""))
    return report
