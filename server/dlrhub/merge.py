"""The state machine of one message: stored state + incoming report -> new state.

Reports of a message (keyed by source and message id) arrive duplicated and
out of order. A report's identity is its digest: a hash of the normalised
report without what depends on its arrival (received time, original text).
Two reports are duplicates exactly when their digests are equal, so a
provider's retry (other white space, other key order) is a duplicate, and two
reports with the same codes and time but another price are two reports.

Every distinct report has a merge key (rank of its status, event time,
digest); a report without event time sorts before every timed report of its
rank. The key depends on the report alone, never on when or in which order it
arrived, and the current state is a maximum, so any order of the same
reports, with any duplicates, ends in the same state:

- status, final flag, raw codes, error, event time, channel (and the
  winner's received time and raw text: those of the first copy of it to
  arrive) come from the report with the greatest key;
- each descriptive field (price, parts, bulk id, reference, recipient,
  sender, MCC/MNC, template id, sent time, entity and application ids) comes
  from the greatest-keyed report that has it.

Merging is idempotent (a duplicate changes nothing), and the state keeps only
the winner's key and each descriptive field's supplier key: its size does not
grow with the history. Whether a report is a duplicate is asked of the store,
which keeps every digest (store/base.py, Transaction.is_stored).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from dlrhub.statuses import RANK

DESCRIPTIVE_FIELDS = (
    "bulk_id",
    "reference",
    "recipient",
    "sender",
    "mcc_mnc",
    "entity_id",
    "application_id",
    "price",
    "parts_total",
    "parts_delivered",
    "template_id",
    "sent_time",
)
_STRING_FIELDS = frozenset(
    ("bulk_id", "reference", "recipient", "sender", "mcc_mnc", "entity_id", "application_id")
)


@dataclass(frozen=True, order=True, slots=True)
class MergeKey:
    """Orders the reports of one message: rank, then event time, then digest."""

    rank: int
    # Event time in nanoseconds since the epoch; NO_EVENT_TIME when the report has none.
    time_ns: int
    digest: bytes


# Before every time a Timestamp can hold (the earliest, in year 1, is -62,135,596,800 s).
NO_EVENT_TIME = -(2**63)


@dataclass(frozen=True, slots=True)
class MessageState:
    """The merged report of one message and what the merge needs to go on."""

    report: DeliveryReport
    # The key of the report the status (and the fields that follow it) came from.
    winner: MergeKey
    # For each descriptive field present in `report`: the key of the report it came from.
    suppliers: Mapping[str, MergeKey]


def digest(report: DeliveryReport) -> bytes:
    """A report's identity: 128 bits of blake2b over its deterministic serialisation without its
    received time and raw text (its source and message id are inside it)."""
    content = DeliveryReport()
    content.CopyFrom(report)
    content.ClearField("received_time")
    content.ClearField("raw_payload")
    return hashlib.blake2b(content.SerializeToString(deterministic=True), digest_size=16).digest()


def merge_key(report: DeliveryReport) -> MergeKey:
    event = report.event_time
    time_ns = event.seconds * 1_000_000_000 + event.nanos if report.HasField("event_time") else NO_EVENT_TIME
    return MergeKey(RANK[report.status], time_ns, digest(report))


def has_field(report: DeliveryReport, name: str) -> bool:
    if name in _STRING_FIELDS:
        return bool(getattr(report, name))
    return report.HasField(name)  # type: ignore[arg-type]  # a DESCRIPTIVE_FIELDS name


def merge(state: MessageState | None, incoming: DeliveryReport, key: MergeKey | None = None) -> MessageState:
    """Merge `incoming` into `state` (None for a message not seen before).

    `key` is merge_key(incoming), for a caller that has it already. Merging a report that is
    already merged returns an equal state.
    """
    if key is None:
        key = merge_key(incoming)
    if state is None:
        suppliers = {name: key for name in DESCRIPTIVE_FIELDS if has_field(incoming, name)}
        return MessageState(_copy(incoming), key, suppliers)
    if key > state.winner:
        report = _copy(incoming)
        suppliers = {name: key for name in DESCRIPTIVE_FIELDS if has_field(incoming, name)}
        sources = (
            (name, state.report, state.suppliers[name]) for name in state.suppliers if name not in suppliers
        )
    else:
        report = _copy(state.report)
        suppliers = dict(state.suppliers)
        sources = (
            (name, incoming, key)
            for name in DESCRIPTIVE_FIELDS
            if has_field(incoming, name) and (name not in suppliers or key > suppliers[name])
        )
    for name, source, supplier in sources:
        _copy_field(report, source, name)
        suppliers[name] = supplier
    return MessageState(report, max(key, state.winner), suppliers)


def _copy(report: DeliveryReport) -> DeliveryReport:
    copy = DeliveryReport()
    copy.CopyFrom(report)
    return copy


def _copy_field(target: DeliveryReport, source: DeliveryReport, name: str) -> None:
    if name in _STRING_FIELDS or name in ("parts_total", "parts_delivered", "template_id"):
        setattr(target, name, getattr(source, name))
    else:
        getattr(target, name).CopyFrom(getattr(source, name))
