"""GMS ("Hyber") delivery reports to DeliveryReports.

Input, in each shape GMS documents:
- a pushed report: one object, or a JSON array of them (a batch), or the XML
  `<DeliveryReport>` (read by `markup`);
- the simple GET-report answer: one object spelled `phone_number` and
  `last_partner` instead of `number` and `sent_via`;
- the advanced GET-report answer `{"reports": [...], "delivered_via": ...}`:
  each attempt in `reports` is a report of its own channel (`last_partner`).
  An attempt that names no channel takes `delivered_via`, the channel the
  message went out on last; the merge makes the last attempt (the best status,
  then the latest time) the message's state, so its channel is the message's;
- the campaign-status answer `{"messages": [...]}`, whose items carry either
  `status`/`substatus`/`hyber_status` or only `error_code`/`error_text`.

`number` may be a JSON number or a string; `time` is Unix epoch milliseconds.
Required: `message_id`, and `status` or (campaign-status items) an
`error_code` that the code table maps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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
from dlrhub.normalise.codes import CodeTable
from dlrhub.normalise.document import Document
from dlrhub.normalise.fields import Fields, InvalidItem, read_item
from dlrhub.normalise.recipient import e164
from dlrhub.normalise.results import NormalisedItem, PayloadError, Rejection
from dlrhub.normalise.timestamps import from_millis
from dlrhub.statuses import FINAL

FORMAT = Format.FORMAT_GMS
FACTS = ("status", "substatus", "hyber_status", "error_code", "sent_via")
SHIPPED_TABLE = "gms_codes.json"
# The envelopes of the GET answers: the advanced report's attempts, the campaign status's messages.
ENVELOPES = ("reports", "messages")

CHANNELS: dict[str, Channel.ValueType] = {
    "sms": Channel.CHANNEL_SMS,
    "viber": Channel.CHANNEL_VIBER,
    "whatsapp": Channel.CHANNEL_WHATSAPP,
    "push": Channel.CHANNEL_PUSH,
}
# Enum values looked up once: attribute access on an enum wrapper is slow per report.
_SOURCE = Source.SOURCE_GMS
_NO_CHANNEL = Channel.CHANNEL_UNSPECIFIED
_UNMAPPED = DeliveryStatus.DELIVERY_STATUS_UNSPECIFIED


def envelope(document: Document) -> str | None:
    """The member holding the reports when the payload is a GET-answer envelope, else None."""
    if isinstance(document.value, dict) and "message_id" not in document.value:
        for key in ENVELOPES:
            if key in document.member_elements:  # an array member of a JSON object
                return key
    return None


def normalise(document: Document, table: CodeTable, received: Timestamp) -> list[NormalisedItem]:
    """Every report of a GMS payload, or the reason each item was rejected."""
    value = document.value
    if isinstance(value, list):
        return _items(value, document.elements, "", _builder(table, ""), received)
    key = envelope(document)
    if key is None:
        return [read_item(0, value, document.text, "", FORMAT, _builder(table, ""), received)]
    delivered_via = value.get("delivered_via") if key == "reports" else None
    if delivered_via is not None and not isinstance(delivered_via, str):
        raise PayloadError(
            Rejection("delivered_via", ErrorReason.WRONG_TYPE, "delivered_via must be a string")
        )
    return _items(
        value[key], document.member_elements[key], key, _builder(table, delivered_via or ""), received
    )


def _items(
    values: list[object],
    texts: list[str],
    path: str,
    build: Callable[[Fields], DeliveryReport],
    received: Timestamp,
) -> list[NormalisedItem]:
    return [
        read_item(index, value, text, f"{path}[{index}]", FORMAT, build, received)
        for index, (value, text) in enumerate(zip(values, texts, strict=True))
    ]


def _builder(table: CodeTable, channel: str) -> Callable[[Fields], DeliveryReport]:
    return functools.partial(_report, table=table, envelope_channel=channel)


def _report(item: Fields, table: CodeTable, envelope_channel: str) -> DeliveryReport:
    message_id = item.required_text("message_id")
    status = item.integer("status", bits=32)
    substatus = item.integer("substatus", bits=32)
    hyber_status = item.integer("hyber_status", bits=32)
    error_code = item.integer("error_code", bits=32)
    sent_via = (
        item.text("sent_via") or item.text("last_partner") or item.text("delivered_via") or envelope_channel
    )
    channel_name = sent_via.lower()
    unified = table.status((status, substatus, hyber_status, error_code, channel_name))
    if status is None and (error_code is None or unified == _UNMAPPED):
        path = item.path_of("status")
        raise InvalidItem(
            Rejection(
                path,
                ErrorReason.MISSING_FIELD,
                f"{path} is required (or, in campaign status, an error_code the code table maps)",
            )
        )

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
                status=status or 0,
                substatus=substatus,
                hyber_status=hyber_status,
                error_code=error_code,
                sent_via=sent_via,
                status_text=item.text("status_text") or "",
            )
        ),
        parts_total=item.integer("total_sms_parts", bits=32),
        parts_delivered=item.integer("delivered_sms_parts", bits=32),
        template_id=item.integer("matching_template_id"),
    )
    time_ms = item.integer("time")
    if time_ms is not None:
        report.event_time.CopyFrom(from_millis(time_ms, item.path_of("time")))
    error_text = item.text("error_text")
    if error_code is not None or error_text:
        report.error.CopyFrom(DeliveryError(code=error_code or 0, description=error_text or ""))
    return report
