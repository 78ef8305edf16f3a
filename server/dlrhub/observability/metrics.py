"""Prometheus metrics (prometheus-client), one registry per running app, served at /metrics on the
admin listener (DLRHUB_ADMIN_LISTEN).

dlrhub_rpc_requests_total{method,code}            RPCs by method and status code
dlrhub_rpc_duration_seconds{method}               RPC latency
dlrhub_reports_total{source,status,outcome}       items by source, unified status and outcome
dlrhub_unmapped_codes_total{source,codes}         raw provider codes that mapped to UNSPECIFIED: the
                                                  first UNMAPPED_CODES_LABELS code strings, then "other"
dlrhub_store_commit_seconds                       duration of each group commit
dlrhub_store_commit_reports                       items per group commit (group-commit batch size)
dlrhub_store_failures_total{operation}            store operations that failed (commit: a group commit)
dlrhub_http_requests_total{route,status}          webhook requests by route and HTTP status
dlrhub_http_connections                           open connections to the webhook port
dlrhub_http_max_connections                       the most it holds (more wait to be accepted)
dlrhub_poller_last_success_timestamp_seconds      when a poll last succeeded
dlrhub_poller_reports_fetched_total               reports fetched by the poller
dlrhub_poller_failures_total{kind}                poll failures: auth, client_error, throttled,
                                                  server_error, timeout, connection, body_too_large,
                                                  store, unexpected
dlrhub_gms_seen_requests_total{outcome}           GMS seen fetcher requests by outcome: seen, not_seen,
                                                  done (no longer delivered, not seen), auth, not_found,
                                                  client_error, throttled, server_error, timeout,
                                                  connection, body_too_large, rejected, store (the
                                                  store could not be read or commit), unexpected
dlrhub_gms_seen_awaiting                          messages the GMS seen fetcher is asking about
dlrhub_gms_seen_expired_total                     messages dropped unseen when their window passed
dlrhub_stream_subscribers                         open Stream subscribers
dlrhub_stream_lag{subscriber}                     changes each subscriber is behind the newest cursor
                                                  (a cursor difference: on PostgreSQL, 0 = caught up)
dlrhub_stream_latest_cursor                       the newest published cursor
dlrhub_stream_lag_seconds                         how long the oldest change committed to a shared
                                                  database (PostgreSQL) has waited to reach this
                                                  process's Streams (0 when caught up; always 0 on
                                                  SQLite): a long transaction anywhere on the
                                                  database holds it back (README, Scaling out)
dlrhub_stream_overflows_total                     times a subscriber fell more than its buffer behind
                                                  (it then catches up from the store)
dlrhub_quarantine_open                            quarantined items not resolved
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport, DeliveryStatus, Source
from deliveryreport.v1.delivery_report_service_pb2 import Format, IngestOutcome, IngestResponse
from dlrhub.feed.hub import Hub
from dlrhub.normalise import NormalisedItem

log = logging.getLogger(__name__)

_SOURCE_OF_FORMAT: dict[int, str] = {
    Format.FORMAT_GMS: "gms",
    Format.FORMAT_SENT_SMS_REPORT: "sent_sms_report",
}
_SOURCES = {Source.SOURCE_GMS: "gms", Source.SOURCE_SENT_SMS_REPORT: "sent_sms_report"}
_OUTCOMES = {
    IngestOutcome.INGEST_OUTCOME_ACCEPTED: "accepted",
    IngestOutcome.INGEST_OUTCOME_DUPLICATE: "duplicate",
    IngestOutcome.INGEST_OUTCOME_REJECTED: "rejected",
}
_UNSPECIFIED = DeliveryStatus.DELIVERY_STATUS_UNSPECIFIED
_STATUS_NAMES = {
    value: name.removeprefix("DELIVERY_STATUS_").lower() for name, value in DeliveryStatus.items()
}
# No label value comes from provider data unbounded: the unmapped-codes counter labels this many
# distinct code strings (per process), and counts any further ones under "other". Each new code
# string is logged once (the first UNMAPPED_CODES_LOGGED of them are remembered; any after that
# are logged each time, and the repeated-line limiter of logs.py bounds those lines).
UNMAPPED_CODES_LABELS = 50
UNMAPPED_CODES_LOGGED = 10_000
OTHER_CODES = "other"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric dlrhub exposes; the parts record into it, /metrics renders it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter(
            "dlrhub_rpc_requests", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.rpc_duration = Histogram(
            "dlrhub_rpc_duration_seconds", "RPC latency", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.reports = Counter(
            "dlrhub_reports",
            "Items by source, unified status and outcome",
            ["source", "status", "outcome"],
            registry=r,
        )
        self.unmapped = Counter(
            "dlrhub_unmapped_codes",
            "Raw provider codes that mapped to UNSPECIFIED",
            ["source", "codes"],
            registry=r,
        )
        self.commit_seconds = Histogram(
            "dlrhub_store_commit_seconds",
            "Duration of each group commit",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_reports = Histogram(
            "dlrhub_store_commit_reports",
            "Items per group commit",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.store_failures = Counter(
            "dlrhub_store_failures", "Store operations that failed", ["operation"], registry=r
        )
        self.http_requests = Counter(
            "dlrhub_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.http_connections = Gauge(
            "dlrhub_http_connections", "Open connections to the webhook port", registry=r
        )
        self.http_max_connections = Gauge(
            "dlrhub_http_max_connections",
            "The most connections the webhook port holds; more wait to be accepted",
            registry=r,
        )
        self.poller_last_success = Gauge(
            "dlrhub_poller_last_success_timestamp_seconds", "When a poll last succeeded", registry=r
        )
        self.poller_fetched = Counter(
            "dlrhub_poller_reports_fetched", "Reports fetched by the poller", registry=r
        )
        self.poller_failures = Counter(
            "dlrhub_poller_failures", "Poll failures by kind", ["kind"], registry=r
        )
        self.gms_seen_requests = Counter(
            "dlrhub_gms_seen_requests", "GMS seen fetcher requests by outcome", ["outcome"], registry=r
        )
        self.gms_seen_awaiting = Gauge(
            "dlrhub_gms_seen_awaiting", "Messages the GMS seen fetcher is asking about", registry=r
        )
        self.gms_seen_expired = Counter(
            "dlrhub_gms_seen_expired", "Messages dropped unseen when their window passed", registry=r
        )

        # The labelled children of the per-call series, looked up once (labels() takes a lock).
        self._rpc_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._report_children: dict[tuple[str, str, str], Counter] = {}
        self._unmapped_children: dict[tuple[str, str], Counter] = {}
        self._unmapped_logged: set[tuple[str, str]] = set()

    def record_rpc(self, method: str, code: str, seconds: float) -> None:
        children = self._rpc_children.get((method, code))
        if children is None:
            children = (self.rpc_requests.labels(method, code), self.rpc_duration.labels(method))
            self._rpc_children[method, code] = children
        requests, duration = children
        requests.inc()
        duration.observe(seconds)

    def watch(
        self, hub: Hub, open_quarantine: Callable[[], int], lag_seconds: Callable[[], float] = lambda: 0.0
    ) -> None:
        """Stream and quarantine gauges, read when scraped (from memory: never from the store)."""
        self.registry.register(_LiveCollector(hub, open_quarantine, lag_seconds))

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)

    def record_ingest(self, items: Sequence[NormalisedItem], response: IngestResponse) -> None:
        """Counts each item's outcome, and the raw codes of reports that mapped to UNSPECIFIED."""
        # A plain dict: a Counter's construction alone cost more than counting a one-report POST.
        counts: dict[tuple[str, str, str], int] = {}
        # One result per item, in order; the item's own report is read (not the result's copy).
        for item, result in zip(items, response.results, strict=True):
            outcome = _OUTCOMES.get(result.outcome, "unknown")
            report = item.report
            if report is not None:
                source = _SOURCES.get(report.source, "unknown")
                if report.status == _UNSPECIFIED and outcome == "accepted":
                    self._count_unmapped(source, raw_codes(report))
                labels = (source, _STATUS_NAMES.get(report.status, "unknown"), outcome)
            else:
                labels = (_SOURCE_OF_FORMAT.get(item.format, "unknown"), "", outcome)
            counts[labels] = counts.get(labels, 0) + 1
        for labels, count in counts.items():  # one update per series, not per item
            child = self._report_children.get(labels)
            if child is None:
                child = self._report_children[labels] = self.reports.labels(*labels)
            child.inc(count)

    def _count_unmapped(self, source: str, codes: str) -> None:
        """Counts a report whose codes map to no status: under its codes while fewer than
        UNMAPPED_CODES_LABELS code strings have a series, else under "other"; logs new codes."""
        child = self._unmapped_children.get((source, codes))
        if child is None:
            if (source, codes) not in self._unmapped_logged:
                log.warning(
                    "provider codes that map to no status: add them to the %s code table",
                    source,
                    extra={"source": source, "codes": codes},
                )
                if len(self._unmapped_logged) < UNMAPPED_CODES_LOGGED:
                    self._unmapped_logged.add((source, codes))
            if len(self._unmapped_children) < UNMAPPED_CODES_LABELS:
                child = self._unmapped_children[source, codes] = self.unmapped.labels(source, codes)
            else:
                child = self.unmapped.labels(source, OTHER_CODES)
        child.inc()

    def record_rejected_payload(self, format: int) -> None:
        self.reports.labels(_SOURCE_OF_FORMAT.get(format, "unknown"), "", "rejected").inc()


def raw_codes(report: DeliveryReport) -> str:
    """The provider's codes as a short label, e.g. "status=3,substatus=37,hyber_status=37001"."""
    raw = report.raw
    if raw.HasField("gms"):
        gms = raw.gms
        optional = [
            f"{name}={getattr(gms, name)}"
            for name in ("substatus", "hyber_status", "error_code")
            if gms.HasField(name)
        ]
        return ",".join([f"status={gms.status}", *optional])
    if raw.HasField("sent_sms_report"):
        codes = raw.sent_sms_report
        return "seen" if codes.seen else f"group_id={codes.group_id},id={codes.id}"
    return ""


class _LiveCollector(Collector):
    def __init__(
        self, hub: Hub, open_quarantine: Callable[[], int], lag_seconds: Callable[[], float]
    ) -> None:
        self._hub = hub
        self._open_quarantine = open_quarantine
        self._lag_seconds = lag_seconds

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        subscriptions = self._hub.subscriptions
        latest = self._hub.latest_cursor
        yield GaugeMetricFamily(
            "dlrhub_stream_subscribers", "Open Stream subscribers", value=len(subscriptions)
        )
        yield GaugeMetricFamily("dlrhub_stream_latest_cursor", "The newest published cursor", value=latest)
        yield GaugeMetricFamily(
            "dlrhub_stream_lag_seconds",
            "How long the oldest committed change not yet readable by this process's Streams has waited",
            value=self._lag_seconds(),
        )
        lag = GaugeMetricFamily(
            "dlrhub_stream_lag", "Changes each subscriber is behind the newest cursor", labels=["subscriber"]
        )
        for subscription in subscriptions:
            lag.add_metric([str(subscription.id)], max(0, latest - subscription.position))
        yield lag
        yield CounterMetricFamily(
            "dlrhub_stream_overflows",
            "Times a Stream subscriber fell out of the live window and caught up from the store",
            value=self._hub.overflows,
        )
        yield GaugeMetricFamily(
            "dlrhub_stream_buffered_bytes",
            "Encoded bytes of the changes in the live window, kept until every subscriber has read them",
            value=self._hub.buffered_bytes,
        )
        yield GaugeMetricFamily(
            "dlrhub_stream_buffered_changes",
            "Changes in the live window",
            value=max(0, self._hub.buffered_changes),
        )
        yield GaugeMetricFamily(
            "dlrhub_quarantine_open", "Quarantined items not resolved", value=self._open_quarantine()
        )
