"""`dlrhub serve --workers N` over PostgreSQL: N processes on the same ports, supervised by the parent
(dlrhub/workers.py). The refusals (SQLite, port 0) are in test_start_failures.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deliveryreport.v1.delivery_report_service_pb2 import IngestRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from tests.helpers import ACCEPTED, PROCESS_TIMEOUT, TIMEOUT, gms, payload_of
from tools import launcher

CONNECTIONS = 24
INGEST = "deliveryreport.v1.DeliveryReportService/Ingest"


def free_ports_in_a_row(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    for _ in range(100):
        first = launcher.free_port()
        sockets = []
        try:
            for port in range(first, first + count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
        return first
    raise AssertionError(f"no {count} free ports in a row")


# The poller and the GMS seen fetcher on, towards a port nobody listens on (they retry, with backoff).
NOWHERE = "http://127.0.0.1:9"
FETCHERS = {
    "DLRHUB_POLL_BASE_URL": NOWHERE,
    "DLRHUB_POLL_API_KEY": "key",
    "DLRHUB_GMS_SEEN_BASE_URL": NOWHERE,
    "DLRHUB_GMS_SEEN_LOGIN": "login",
    "DLRHUB_GMS_SEEN_PASSWORD": "password",
}


@pytest.fixture
def workers(postgres_db: str) -> Iterator[tuple[launcher.Server, list[int], int]]:
    """`dlrhub serve --workers 2` on fixed ports, with both fetchers configured, its workers' pids,
    and worker 0's admin port (worker 1's is the next)."""
    admin = free_ports_in_a_row(2)
    server = launcher.start(
        postgres_db,
        ["--workers", "2"],
        env={**os.environ, **FETCHERS},
        listen=f"127.0.0.1:{launcher.free_port()}",
        http_listen=f"127.0.0.1:{launcher.free_port()}",
        admin_listen=f"127.0.0.1:{admin}",
    )
    with server:
        started = _log_entry(server, "workers started")
        pids = [int(pid) for pid in started["workers"].values()]
        assert len(pids) == 2
        assert server.pid not in pids
        _wait(lambda: all(_metrics(f"127.0.0.1:{admin + n}") for n in range(2)), "both workers serve")
        yield server, pids, admin


def _log_entries(server: launcher.Server, message: str) -> list[dict[str, Any]]:
    return [
        dict(entry)
        for line in server.output.lines()
        if line.startswith("{") and (entry := json.loads(line)).get("message") == message
    ]


def _log_entry(server: launcher.Server, message: str) -> dict[str, Any]:
    entries = _log_entries(server, message)
    assert entries, f"no {message!r} line in:\n{server.output.text()}"
    return entries[0]


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"not within {PROCESS_TIMEOUT} s: {what}"
        time.sleep(0.05)


def _metrics(address: str) -> str:
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=TIMEOUT) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""


def _ingested(metrics: str) -> int:
    """Ingest calls answered OK, by the exposition text."""
    return sum(
        int(sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "dlrhub_rpc_requests_total" and sample.labels == {"method": INGEST, "code": "OK"}
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_two_workers_share_the_ports_and_sigterm_stops_both(
    workers: tuple[launcher.Server, list[int], int],
) -> None:
    server, pids, admin = workers
    for n in range(CONNECTIONS):  # a connection each: the kernel spreads connections, not calls
        with grpc.insecure_channel(server.address) as channel:
            response = DeliveryReportServiceStub(channel).Ingest(
                IngestRequest(payload=payload_of(gms(f"worker-{n}"))), timeout=TIMEOUT
            )
            assert [result.outcome for result in response.results] == [ACCEPTED]
    counts = [_ingested(_metrics(f"127.0.0.1:{admin + n}")) for n in range(2)]
    assert sum(counts) == CONNECTIONS
    assert all(counts), f"every connection went to one worker: {counts}"  # 2 in 2**23 by chance

    assert server.stop() == 0
    assert all(_gone(pid) for pid in pids)
    assert "workers stopped" in server.output.text()


def test_a_worker_that_dies_stops_the_others_and_the_parent_fails(
    workers: tuple[launcher.Server, list[int], int],
) -> None:
    server, pids, _ = workers
    os.kill(pids[0], signal.SIGKILL)
    assert server.process.wait(PROCESS_TIMEOUT) == 1
    _wait(lambda: _gone(pids[1]), "the other worker stopped")
    stopped = _log_entry(server, "a worker exited: stopping the others")
    assert (stopped["worker"], stopped["pid"], stopped["status"]) == (0, pids[0], -signal.SIGKILL)


def test_only_worker_0_runs_the_fetchers(workers: tuple[launcher.Server, list[int], int]) -> None:
    """N pollers would ask the provider N times as often and replay the same staged bodies at once;
    N seen fetchers would ask GMS about every message N times."""
    server, pids, _ = workers
    _wait(lambda: len(_log_entries(server, "serving")) == 2, "both workers log that they serve")
    serving = {entry["pid"]: entry for entry in _log_entries(server, "serving")}
    assert sorted(serving) == sorted(pids)
    fetchers = [(serving[pid]["poller"], serving[pid]["gms_seen"]) for pid in pids]
    assert fetchers == [(True, True), (False, False)]
