"""Ingest's request ids (#13.1, #19.11): a retry replays the first answer, a reused id with another
request is refused and stores nothing, ids expire, and an id is bounded before it is logged."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest

from deliveryreport.v1.delivery_report_service_pb2 import (
    Format,
    GetMessageRequest,
    IngestOutcome,
    IngestRequest,
    IngestResponse,
    ListQuarantineRequest,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from deliveryreport.v1.provider_formats_pb2 import GmsReport, GmsReports
from dlrhub.store import SavedResponse
from dlrhub_client.errors import DlrhubClientError, from_rpc_error
from tests.conftest import FakeClock, Running, serving

# Each test runs over SQLite and over PostgreSQL (conftest.py).
pytestmark = pytest.mark.engines

ACCEPTED = IngestOutcome.INGEST_OUTCOME_ACCEPTED
DUPLICATE = IngestOutcome.INGEST_OUTCOME_DUPLICATE
TIMEOUT = 10.0
DAY = 86_400


def gms(message_id: str, status: int = 2, time_ms: int = 1_477_417_294_667) -> str:
    return json.dumps([{"message_id": message_id, "status": status, "time": time_ms, "sent_via": "sms"}])


async def ingest(server: Running, payload: str, request_id: str, **fields: Any) -> IngestResponse:
    request = IngestRequest(payload=payload, request_id=request_id, **fields)
    response: IngestResponse = await server.stub.Ingest(request, timeout=TIMEOUT)
    return response


async def refused(call: Awaitable[Any]) -> DlrhubClientError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return from_rpc_error(raised.value)


def stored_ids(server: Running, *message_ids: str) -> list[str]:
    """Which of the message ids are stored."""
    found = []
    for message_id in message_ids:
        if server.app.store.messages(message_id):
            found.append(message_id)
    return found


async def open_quarantine(server: Running) -> int:
    listing = await server.stub.ListQuarantine(ListQuarantineRequest(), timeout=TIMEOUT)
    return int(listing.open_count)


def saved_request_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return [row[0] for row in connection.execute("SELECT request_id FROM requests ORDER BY request_id")]


# --- a retry, and a reused id --------------------------------------------------------------------


async def test_a_retry_gets_the_first_answer_marked_replayed(server: Running) -> None:
    first = await ingest(server, gms("rid-1"), "nightly-1")
    assert not first.replayed
    assert [result.outcome for result in first.results] == [ACCEPTED]
    latest = server.app.store.latest_cursor()

    server.clock.advance(3600)
    again = await ingest(server, gms("rid-1"), "nightly-1")

    assert again.replayed
    again.replayed = False
    assert again == first  # the first answer, cursor and all: not DUPLICATE
    assert server.app.store.latest_cursor() == latest


async def test_a_reused_id_with_another_request_is_refused_and_stores_nothing(server: Running) -> None:
    """#13.1: a nightly job with a fixed request id lost every night after the first."""
    await ingest(server, gms("night-1"), "nightly")
    latest = server.app.store.latest_cursor()

    error = await refused(ingest(server, gms("night-2"), "nightly"))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "REQUEST_ID_REUSED"
    assert [(v.field, v.reason) for v in error.violations] == [("request_id", "REQUEST_ID_REUSED")]
    assert error.metadata == {"request_id": "nightly"}
    assert "another request" in error.message
    assert server.app.store.latest_cursor() == latest
    assert stored_ids(server, "night-1", "night-2") == ["night-1"]
    # Not even a rejected payload under a reused id is kept: nothing of the request is stored.
    error = await refused(ingest(server, "not json", "nightly"))
    assert error.reason == "REQUEST_ID_REUSED"
    assert await open_quarantine(server) == 0


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"payload": gms("same") + " "}, id="other-white-space"),
        pytest.param({"payload": gms("same"), "format": Format.FORMAT_GMS}, id="other-format"),
        pytest.param(
            {"gms": GmsReports(reports=[GmsReport(message_id="same", status=2, time=1_477_417_294_667)])},
            id="typed-reports",
        ),
    ],
)
async def test_a_request_is_its_format_and_exact_payload(server: Running, other: dict[str, Any]) -> None:
    """What a retry must repeat: the format and the payload text byte for byte (typed reports are
    the JSON the server builds from them)."""
    await ingest(server, gms("same"), "exact")

    error = await refused(server.stub.Ingest(IngestRequest(request_id="exact", **other), timeout=TIMEOUT))

    assert error.reason == "REQUEST_ID_REUSED"


async def test_typed_reports_are_replayed_to_the_same_typed_reports(server: Running) -> None:
    batch = GmsReports(reports=[GmsReport(message_id="typed-1", status=2, time=1_477_417_294_667)])
    first = await server.stub.Ingest(IngestRequest(gms=batch, request_id="typed"), timeout=TIMEOUT)
    again = await server.stub.Ingest(IngestRequest(gms=batch, request_id="typed"), timeout=TIMEOUT)
    assert (first.replayed, again.replayed) == (False, True)
    assert again.results == first.results


async def test_in_one_group_commit_the_first_request_wins_the_id(server: Running) -> None:
    calls = [ingest(server, gms(f"race-{number}"), "race") for number in range(6)]
    answers = await asyncio.gather(*calls, return_exceptions=True)

    accepted = [answer for answer in answers if isinstance(answer, IngestResponse)]
    refusals = [from_rpc_error(a) for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(accepted) == 1
    assert not accepted[0].replayed
    assert [error.reason for error in refusals] == ["REQUEST_ID_REUSED"] * 5
    [winner] = [result.message_id for result in accepted[0].results]
    assert stored_ids(server, *(f"race-{number}" for number in range(6))) == [winner]


# --- expiry --------------------------------------------------------------------------------------


async def test_an_expired_id_is_new_again(server: Running) -> None:
    first = await ingest(server, gms("exp-1"), "expiring")
    server.clock.advance(DAY - 1)
    assert (await ingest(server, gms("exp-1"), "expiring")).replayed  # within the 24 hours
    server.clock.advance(2)

    # The same request is applied again: its report is a duplicate now, not a replay.
    again = await ingest(server, gms("exp-1"), "expiring")
    assert not again.replayed
    assert [result.outcome for result in again.results] == [DUPLICATE]
    assert again != first
    # Another request under the id is a new request, and that new answer is what is replayed now.
    server.clock.advance(DAY + 1)
    other = await ingest(server, gms("exp-2"), "expiring")
    assert [result.outcome for result in other.results] == [ACCEPTED]
    assert (await ingest(server, gms("exp-2"), "expiring")).replayed


async def test_expired_answers_are_deleted_in_the_background(tmp_path: Path) -> None:
    clock = FakeClock()
    # A TTL of 2 s: the expiry runs every second (half of it).
    async with serving(tmp_path, clock=clock, request_id_ttl=2) as app:
        address = f"127.0.0.1:{app.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = DeliveryReportServiceStub(channel)
            for number in range(3):
                await stub.Ingest(IngestRequest(payload=gms(f"bg-{number}"), request_id=f"bg-{number}"))
            clock.advance(2)
            await stub.Ingest(IngestRequest(payload=gms("bg-new"), request_id="bg-new"))
            db = tmp_path / "dlrhub.db"
            assert saved_request_ids(db) == ["bg-0", "bg-1", "bg-2", "bg-new"]

            clock.advance(1)  # bg-0..2 are 3 s old, bg-new 1 s
            for _ in range(50):
                if saved_request_ids(db) == ["bg-new"]:
                    break
                await asyncio.sleep(0.1)
            assert saved_request_ids(db) == ["bg-new"]


async def test_expiry_deletes_in_batches(server: Running) -> None:
    with server.app.store.transaction() as tx:  # the writer thread is idle: the test writes directly
        for number in range(1_201):
            tx.save_response(f"old-{number}", SavedResponse(b"digest", b""), 1_000)
    assert await server.app.expiry.expire() == 1_201
    assert await server.app.expiry.expire() == 0


# --- bounded ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_id", "description"),
    [
        pytest.param("x" * 129, "is 129 characters long; at most 128 are allowed", id="129-characters"),
        pytest.param(
            "y" * (15 * 1024 * 1024), "is 15728640 characters long; at most 128 are allowed", id="15-MiB"
        ),
        pytest.param("line\nbreak", "must not contain control characters", id="newline"),
        pytest.param("nul\x00", "must not contain control characters", id="nul"),
    ],
)
async def test_a_request_id_is_bounded_before_it_is_logged_or_stored(
    server: Running, caplog: pytest.LogCaptureFixture, request_id: str, description: str
) -> None:
    caplog.set_level(logging.DEBUG)
    error = await refused(ingest(server, gms("bounded"), request_id))
    server.app.flush_logs()

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_REQUEST_ID"
    assert [(v.field, v.description) for v in error.violations] == [("request_id", description)]
    assert error.message == f"request_id {description}"
    assert stored_ids(server, "bounded") == []
    assert await open_quarantine(server) == 0
    assert await server.app.committer.run(lambda tx: tx.find_response(request_id, 0)) is None  # not saved
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert request_id[:129] not in logged


async def test_a_request_id_of_128_characters_is_kept(server: Running) -> None:
    request_id = "z" * 128
    await ingest(server, gms("long-id"), request_id)
    assert (await ingest(server, gms("long-id"), request_id)).replayed


async def test_the_x_request_id_metadata_is_cut_in_log_lines(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dlrhub.observability.calls")
    header = "h" * 128 + "TAIL" * 1000
    with pytest.raises(grpc.aio.AioRpcError):
        await server.stub.GetMessage(
            GetMessageRequest(message_id="no-such"), metadata=[("x-request-id", header)], timeout=TIMEOUT
        )
    server.app.flush_logs()
    [line] = [record for record in caplog.records if record.getMessage() == "rpc"]
    assert getattr(line, "request_id", None) == "h" * 128


# --- the CLI -------------------------------------------------------------------------------------

_SCRIPT = shutil.which("dlrhub", path=str(Path(sys.executable).parent))
DLRHUB = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "dlrhub.cli"]


async def dlrhub(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *DLRHUB, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_says_an_answer_was_replayed_and_exits_3_on_a_reused_id(
    server: Running, tmp_path: Path
) -> None:
    night_1, night_2 = tmp_path / "night-1.json", tmp_path / "night-2.json"
    night_1.write_text(gms("cli-night-1"))
    night_2.write_text(gms("cli-night-2"))
    options = ["--request-id", "nightly-export", "--target", server.address]

    assert await dlrhub("ingest", str(night_1), *options) == (0, "accepted 1, duplicate 0, rejected 0\n", "")

    code, out, err = await dlrhub("ingest", str(night_1), *options)
    assert (code, out) == (0, "accepted 1, duplicate 0, rejected 0\n")
    assert "'nightly-export' was answered before: its first answer again" in err

    code, out, err = await dlrhub("ingest", str(night_2), *options)
    assert (code, out) == (3, "")
    assert "request id 'nightly-export'" in err
    assert "was used by another request" in err
    assert "accepted" not in err
    assert stored_ids(server, "cli-night-1", "cli-night-2") == ["cli-night-1"]
