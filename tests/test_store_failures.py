"""A store that cannot commit, under a real `dlrhub serve`: failures are counted, not shouted.

The disk "fills up" under the running server: its file-size limit (RLIMIT_FSIZE, set on the
process from outside with prlimit, as an unprivileged user may on a child) drops to one byte, so
every write that grows the database or its WAL fails (EFBIG; Python ignores SIGXFSZ), as on a full
disk. Every Ingest and webhook POST then fails, and each would have logged an ERROR line with its
traceback; the log holds the first of each kind and a count per interval instead, and the metrics
count every failed commit.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, IngestRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from tests.helpers import TIMEOUT, gms_batch, scrape, value
from tools import launcher

REPEAT_INTERVAL = 1.0
FAILING_INGESTS = 300
FAILING_POSTS = 100


@pytest.fixture
def failing_server(db_path: Path) -> Iterator[launcher.Server]:
    env = {**os.environ, "DLRHUB_LOG_REPEAT_INTERVAL": str(REPEAT_INTERVAL)}
    with launcher.start(db_path, env=env) as server:
        yield server


async def test_a_full_disk_logs_each_failure_once_then_counts(
    failing_server: launcher.Server,
) -> None:
    server = failing_server
    pid = server.pid
    async with (
        grpc.aio.insecure_channel(server.address) as channel,
        httpx.AsyncClient(timeout=TIMEOUT) as http,
    ):
        stub = DeliveryReportServiceStub(channel)
        assert (
            await stub.Ingest(IngestRequest(payload=gms_batch("before")), timeout=TIMEOUT)
        ).accepted_count == 1
        before = await scrape(server.admin_port)

        limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, limits[1]))  # the disk is full
        try:
            for number in range(FAILING_INGESTS):  # one at a time: each call is a group commit of its own
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.Ingest(IngestRequest(payload=gms_batch(f"lost-{number}")), timeout=TIMEOUT)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            for number in range(FAILING_POSTS):
                answer = await http.post(
                    f"http://{server.http_address}/webhooks/gms", content=gms_batch(f"hook-{number}")
                )
                assert answer.status_code == 503
                assert answer.json()["error"]["reason"] == "STORE_UNAVAILABLE"
            during = await scrape(server.admin_port)
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)  # space again

        after_recovery = await stub.Ingest(IngestRequest(payload=gms_batch("after")), timeout=TIMEOUT)
        assert after_recovery.accepted_count == 1
        assert [
            r.message_id for r in (await stub.GetMessage(GetMessageRequest(message_id="after"))).messages
        ] == ["after"]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:  # what failed was not stored
            await stub.GetMessage(GetMessageRequest(message_id="lost-0"), timeout=TIMEOUT)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    failures = FAILING_INGESTS + FAILING_POSTS
    commit_failures = value(during, "dlrhub_store_failures_total", operation="commit")
    assert commit_failures - value(before, "dlrhub_store_failures_total", operation="commit") == failures

    assert server.stop() == 0  # the summaries of intervals still running are written at exit
    entries = [json.loads(line) for line in server.output.stderr if line.startswith("{")]
    loud = [entry for entry in entries if entry["level"] in ("WARNING", "ERROR")]
    committer = [entry for entry in loud if entry["logger"] == "dlrhub.write.committer"]
    webhooks = [entry for entry in loud if entry["logger"] == "dlrhub.transport.webhooks"]
    health = [entry for entry in loud if entry["logger"] == "dlrhub.observability.health"]
    assert len(loud) == len(committer) + len(webhooks) + len(health), loud  # nothing else went wrong
    # The store's health changed twice, each said once: NOT_SERVING at the first failure, SERVING again.
    assert [entry["level"] for entry in health] == ["ERROR", "WARNING"]

    # The first failure of each kind with its traceback, then counts: every failure accounted for.
    for lines, total in ((committer, failures), (webhooks, FAILING_POSTS)):
        first, *summaries = lines
        assert "exception" in first
        assert "repeated" not in first
        assert all("exception" not in summary for summary in summaries)
        assert sum(summary["repeated"] for summary in summaries) == total - 1
    assert committer[0]["message"] == "commit failed for 1 submissions"
    assert "disk I/O error" in committer[0]["exception"]
    assert webhooks[0]["message"] == "webhook could not commit"
    # Without the filter: one ERROR line per failed commit, and one more per failed POST.
    assert len(loud) < 40, f"{len(loud)} WARNING/ERROR lines for {failures} failures"
