"""Micro-benchmark: the cost per report of normalising and merging, beside JSON and protobuf baselines.

Run from the repository root:

    .venv/bin/python bench/normalise_bench.py

It measures, in microseconds per report:
  (a) Normaliser.normalise of one GMS report text,
  (b) Normaliser.normalise of a GMS batch (a JSON array) of 100 reports,
  (c) Normaliser.normalise of a SentSMSReport {"results": [...]} of 100 reports,
  (d) merge() of a report into an existing state (a new winner),
and, as baselines in the same run,
  (e) json.loads of the same single GMS text,
  (f) google.protobuf.json_format.ParseDict of the equivalent DeliveryReport dict,
  (g) orjson.loads of the same single GMS text (only if orjson is installed);
and, for where the server stops normalising on the event loop (dlrhub.write.writer.INLINE_BYTES),
  (h) a hop from an asyncio event loop to a worker thread and back (run_in_executor of a no-op),
  (i) Normaliser.normalise of a GMS batch of INLINE_BYTES, per call.
Each figure is the best of 5 runs of about 0.2 s each (time.perf_counter_ns).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import google.protobuf
from google.protobuf import json_format
from google.protobuf.internal import api_implementation
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.merge import MessageState, merge
from dlrhub.normalise import Normaliser
from dlrhub.write.writer import INLINE_BYTES

RUNS = 5
RUN_NS = 200_000_000  # about 0.2 s per run
BATCH = 100


def gms_item(index: int) -> dict[str, Any]:
    return {
        "number": 380961111111 + index,
        "time": 1477417294667 + index,
        "status": 2,
        "substatus": 23,
        "hyber_status": 23011,
        "message_id": f"9f60ac8f-e721-5027-b838-{index:012x}",
        "extra_id": f"AD-6640-{7006 + index}",
        "sent_via": "sms",
        "total_sms_parts": 1,
        "delivered_sms_parts": 1,
    }


def sent_sms_report_item(index: int) -> dict[str, Any]:
    return {
        "bulkId": "BULK-ID-123-xyz",
        "messageId": f"MESSAGE-ID-{index:06d}",
        "to": f"4179302{index:04d}",
        "sentAt": "2019-11-09T16:00:00.000+0000",
        "doneAt": "2019-11-09T16:00:00.000+0000",
        "smsCount": 1,
        "price": {"pricePerMessage": 0.01, "currency": "EUR"},
        "status": {
            "groupId": 3,
            "groupName": "DELIVERED",
            "id": 5,
            "name": "DELIVERED_TO_HANDSET",
            "description": "Message delivered to handset",
        },
        "error": {
            "groupId": 0,
            "groupName": "Ok",
            "id": 0,
            "name": "NO_ERROR",
            "description": "No Error",
            "permanent": False,
        },
        "entityId": "my-entity-id",
        "applicationId": "my-application-id",
    }


def best_ns_per_call(call: Callable[[], object]) -> float:
    """Best of RUNS runs of about RUN_NS each, in nanoseconds per call."""
    loops = 1
    while True:
        elapsed = _run(call, loops)
        if elapsed >= RUN_NS // 10:
            break
        loops *= 2
    loops = max(1, loops * RUN_NS // elapsed)
    return min(_run(call, loops) for _ in range(RUNS)) / loops


def _run(call: Callable[[], object], loops: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(loops):
        call()
    return time.perf_counter_ns() - start


def hop_ns(hops: int = 2000) -> float:
    """Nanoseconds per hop from the event loop to a worker thread and back: best of RUNS runs."""

    async def run(pool: ThreadPoolExecutor) -> int:
        loop = asyncio.get_running_loop()
        start = time.perf_counter_ns()
        for _ in range(hops):
            await loop.run_in_executor(pool, int)
        return time.perf_counter_ns() - start

    with ThreadPoolExecutor(max_workers=2) as pool:
        return min(asyncio.run(run(pool)) for _ in range(RUNS)) / hops


def reports_of(normaliser: Normaliser, text: str, received: Timestamp) -> list[DeliveryReport]:
    """The reports of `text`, checking that no item was rejected (a rejection would be cheaper)."""
    items = normaliser.normalise(text, Format.FORMAT_UNSPECIFIED, received)
    reports = [item.report for item in items if item.report is not None]
    if len(reports) != len(items):
        raise SystemExit(f"benchmark payload rejected: {[item.rejection for item in items]}")
    return reports


def main() -> None:
    normaliser = Normaliser.load()
    received = Timestamp(seconds=1_573_315_300)

    single = json.dumps(gms_item(0))
    gms_batch = json.dumps([gms_item(index) for index in range(BATCH)])
    sent_sms_report_batch = json.dumps({"results": [sent_sms_report_item(i) for i in range(BATCH)]})
    (report,) = reports_of(normaliser, single, received)
    assert len(reports_of(normaliser, gms_batch, received)) == BATCH
    assert len(reports_of(normaliser, sent_sms_report_batch, received)) == BATCH

    # A message with three reports (accepted, sent, delivered), and a later delivered report.
    gms_history = [
        {**gms_item(0), "time": 1477417290000, "status": 1, "substatus": 12, "hyber_status": None},
        {**gms_item(0), "time": 1477417291000, "status": 1, "substatus": 11, "hyber_status": None},
        gms_item(0),
    ]
    state: MessageState | None = None
    for item in gms_history:
        (earlier,) = reports_of(normaliser, json.dumps(item), received)
        state = merge(state, earlier)
    assert state is not None
    existing = state
    later_item = {**gms_item(0), "time": 1477417299000, "sent_via": "viber", "hyber_status": 23033}
    (later,) = reports_of(normaliser, json.dumps(later_item), received)
    assert merge(existing, later).report.raw_payload == later.raw_payload

    inline_batch = json.dumps([gms_item(index) for index in range(INLINE_BYTES // len(single))])
    report_dict = json_format.MessageToDict(report)
    gms, sms_reports = Format.FORMAT_GMS, Format.FORMAT_SENT_SMS_REPORT

    rows: list[tuple[str, float]] = [
        (
            "(a) normalise, one GMS report",
            best_ns_per_call(lambda: normaliser.normalise(single, gms, received)),
        ),
        (
            f"(b) normalise, GMS batch of {BATCH}",
            best_ns_per_call(lambda: normaliser.normalise(gms_batch, gms, received)) / BATCH,
        ),
        (
            f"(c) normalise, SentSMSReport results of {BATCH}",
            best_ns_per_call(lambda: normaliser.normalise(sent_sms_report_batch, sms_reports, received))
            / BATCH,
        ),
        ("(d) merge, a new winner into a state of 3", best_ns_per_call(lambda: merge(existing, later))),
        ("(e) json.loads, one GMS report", best_ns_per_call(lambda: json.loads(single))),
        (
            "(f) json_format.ParseDict, one DeliveryReport",
            best_ns_per_call(lambda: json_format.ParseDict(report_dict, DeliveryReport())),
        ),
    ]
    try:
        orjson = importlib.import_module("orjson")
    except ImportError:
        rows.append(("(g) orjson.loads: skipped, orjson not installed", float("nan")))
    else:
        rows.append(("(g) orjson.loads, one GMS report", best_ns_per_call(lambda: orjson.loads(single))))
    hop = hop_ns()
    rows.append(("(h) event loop -> worker thread -> event loop, per hop", hop))
    inline = best_ns_per_call(lambda: normaliser.normalise(inline_batch, gms, received))
    rows.append((f"(i) normalise, a GMS batch of {len(inline_batch)} bytes, per call", inline))

    print(
        f"Python {platform.python_version()} ({sys.implementation.name}), "
        f"protobuf {google.protobuf.__version__} ({api_implementation.Type()}); "
        f"best of {RUNS} runs of ~{RUN_NS / 1e9:.1f} s"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  {'us/report':>10}  {'reports/s':>10}")
    for name, ns in rows:
        if math.isnan(ns):  # not measured
            print(f"{name:<{width}}  {'-':>10}  {'-':>10}")
        else:
            print(f"{name:<{width}}  {ns / 1000:>10.2f}  {1e9 / ns:>10,.0f}")
    measured = dict(rows)
    normalise_one = measured["(a) normalise, one GMS report"]
    print()
    print(f"(a) / (e) json.loads: {normalise_one / measured['(e) json.loads, one GMS report']:.1f}x")
    print(
        f"(a) / (f) ParseDict:  "
        f"{normalise_one / measured['(f) json_format.ParseDict, one DeliveryReport']:.2f}x"
    )
    switch_ms = sys.getswitchinterval() * 1000
    print(
        f"(h) / (i): a hop costs {hop / inline:.0%} of normalising {INLINE_BYTES} bytes, which holds the"
        f" event loop {inline / 1e6:.2f} ms (a worker thread holds the GIL {switch_ms:g} ms at a time)"
    )


if __name__ == "__main__":
    main()
