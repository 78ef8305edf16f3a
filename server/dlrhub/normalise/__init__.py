"""Provider payloads to unified DeliveryReports: pure functions, one module per format.

    normaliser = Normaliser.load()
    items = normaliser.normalise(body, Format.FORMAT_UNSPECIFIED, received)
    items = normaliser.normalise(body, format, received, default_channel=Channel.CHANNEL_WHATSAPP)

Each item is a report (with its original text in `raw_payload`) or a
rejection naming the field path; a payload that is unusable as a whole
raises PayloadError, and one with more than `max_items` items TooManyItems
(found while decoding: the rest is never read). `default_channel` is the channel the endpoint a payload
arrived at serves (a per-channel webhook URL, the poller's setting): it is
the channel of a SentSMSReport report whose body names none.
"""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import Channel
from deliveryreport.v1.delivery_report_service_pb2 import Format
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from deliveryreport.v1.provider_formats_pb2 import GmsReports, SentSmsReports
from dlrhub.normalise import gms, markup, sent_sms_report
from dlrhub.normalise.codes import CodeTable
from dlrhub.normalise.document import Document, TooManyItems, decode
from dlrhub.normalise.results import NormalisedItem, PayloadError, Rejection
from dlrhub_client.payloads import batch

__all__ = [
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


class Normaliser:
    """The normalisers of both formats, bound to their code tables."""

    def __init__(self, gms_table: CodeTable, sent_sms_report_table: CodeTable) -> None:
        self.gms_table = gms_table
        self.sent_sms_report_table = sent_sms_report_table

    @classmethod
    def load(cls, gms_codes: Path | None = None, sent_sms_report_codes: Path | None = None) -> Normaliser:
        """The shipped code tables, each extended or replaced by an operator's file."""
        return cls(
            CodeTable.load(gms.FACTS, gms.SHIPPED_TABLE, gms_codes),
            CodeTable.load(sent_sms_report.FACTS, sent_sms_report.SHIPPED_TABLE, sent_sms_report_codes),
        )

    def normalise(
        self,
        payload: str,
        format: Format.ValueType,
        received: Timestamp,
        *,
        default_channel: Channel.ValueType = Channel.CHANNEL_SMS,
        max_items: int | None = None,
    ) -> list[NormalisedItem]:
        """Every item of a provider payload; raises PayloadError if it is unusable as a whole, and
        TooManyItems if it holds more than `max_items` items."""
        if markup.is_markup(payload):  # only GMS sends XML
            if format not in (Format.FORMAT_UNSPECIFIED, Format.FORMAT_GMS):
                raise PayloadError(
                    Rejection("", ErrorReason.WRONG_TYPE, "a SentSMSReport payload must be JSON, not XML")
                )
            return gms.normalise(markup.decode(payload), self.gms_table, received)
        document = decode(payload, max_items)
        if format == Format.FORMAT_UNSPECIFIED:
            format = detect_format(document)
        if format == Format.FORMAT_GMS:
            return gms.normalise(document, self.gms_table, received)
        if format == Format.FORMAT_SENT_SMS_REPORT:
            return sent_sms_report.normalise(document, self.sent_sms_report_table, received, default_channel)
        raise PayloadError(Rejection("format", ErrorReason.INVALID_VALUE, f"unknown format {format}"))


def detect_format(document: Document) -> Format.ValueType:
    """SentSMSReport for an object with `results`; GMS for an array, an object with `message_id`, or a
    GET-answer envelope (`{"reports": [...]}`, `{"messages": [...]}`). XML is always GMS."""
    value = document.value
    if isinstance(value, list):
        return Format.FORMAT_GMS
    if isinstance(value, dict):
        if "results" in value:
            return Format.FORMAT_SENT_SMS_REPORT
        if "message_id" in value or gms.envelope(document) is not None:
            return Format.FORMAT_GMS
    raise PayloadError(
        Rejection(
            "",
            ErrorReason.UNKNOWN_FORMAT,
            'cannot tell the format: expected a GMS report (an object with "message_id", an array of them,'
            ' or a GET answer {"reports": [...]} or {"messages": [...]}) or a SentSMSReport body'
            ' ({"results": [...]}); set the format to say which',
        )
    )


def single_item_payload(raw: str, format: int) -> str:
    """The payload that carries one item of a batch on its own, as it came (to run it again)."""
    if markup.is_markup(raw) or format not in (Format.FORMAT_GMS, Format.FORMAT_SENT_SMS_REPORT):
        return raw  # an XML report is a whole payload already; so is an item of unknown format
    return batch(Format.ValueType(format), [raw])


def typed_payload(reports: GmsReports | SentSmsReports) -> tuple[str, Format.ValueType]:
    """Typed reports as the provider's own JSON text, so they take the same path as a payload."""
    if isinstance(reports, GmsReports):
        return json.dumps([_as_json(report, camel=False) for report in reports.reports]), Format.FORMAT_GMS
    body = {"results": [_as_json(report, camel=True) for report in reports.results]}
    return json.dumps(body), Format.FORMAT_SENT_SMS_REPORT


def _as_json(message: Message, *, camel: bool) -> dict[str, object]:
    """The set fields of a provider mirror, under the provider's spelling (GMS snake, SentSMSReport camel)."""
    return {
        (field.json_name if camel else field.name): _as_json(value, camel=camel)
        if field.message_type
        else value
        for field, value in message.ListFields()
    }
