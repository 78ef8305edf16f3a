"""The provider-facing HTTP port: secure defaults, the admin port, bounded connections and time.

Real servers on free ports; the connections that misbehave (idle, slow headers, slow bodies, a TLS
handshake never made) are raw sockets. Linux-only where a limit is set on the server process from
outside (resource.prlimit), as the CI runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, IngestRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.transport.listener import FILE_RESERVE
from dlrhub.transport.webhook_access import AllowList
from tests.certs import make_certs
from tests.conftest import FakeClock, serving
from tests.helpers import TIMEOUT, gms_batch, scrape, ssr, ssr_payload, value
from tools import launcher

GMS = "/webhooks/gms"
SMS = "/webhooks/sent-sms-report"
SMS_VIBER = "/webhooks/sent-sms-report/viber"


def post(path: str, body: str, *, keep_alive: bool = False) -> bytes:
    """A complete HTTP/1.1 POST, as raw bytes."""
    connection = "keep-alive" if keep_alive else "close"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: dlrhub\r\nContent-Length: {len(body)}\r\nConnection: {connection}\r\n"
    )
    return (head + "\r\n" + body).encode()


async def closed_by_server(reader: asyncio.StreamReader, within: float = TIMEOUT) -> bytes:
    """Everything the server sent until it closed the connection (fails if it does not in time)."""
    return await asyncio.wait_for(reader.read(), within)


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without any DLRHUB_* setting, plus `variables`."""
    kept = {key: val for key, val in os.environ.items() if not key.startswith("DLRHUB_")}
    return {**kept, "PYTHONUNBUFFERED": "1", **variables}


# --- secure defaults: tokens with an open webhook ---------------------------------------------


def test_tokens_with_open_webhooks_refuse_to_start_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "refused.db"
    finished = subprocess.run(
        [sys.executable, "-m", "dlrhub.cli", "serve", "--listen", "127.0.0.1:0", "--db", str(db)],
        env=environment(DLRHUB_TOKENS="ingest:t0ken-1", DLRHUB_HTTP_LISTEN="127.0.0.1:0"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert finished.returncode == 2
    [line] = finished.stderr.splitlines()  # the one line of a failed start (tests/test_start_failures.py)
    assert line.startswith("dlrhub: cannot start: ")
    message = line
    for named in (GMS, SMS, "DLRHUB_GMS_WEBHOOK_AUTH", "DLRHUB_SENT_SMS_REPORT_WEBHOOK_AUTH"):
        assert named in message
    assert "DLRHUB_WEBHOOKS_OPEN=1" in message
    assert "t0ken-1" not in message
    assert not db.exists()  # refused before anything started


async def test_a_tokens_file_counts_as_tokens_and_only_the_open_route_is_named(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"tokens": [{"token": "t0ken-2", "roles": ["read"]}]}))
    with pytest.raises(ValueError, match="DLRHUB_WEBHOOKS_OPEN=1") as refused:
        async with serving(tmp_path, tokens_file=tokens_file, gms_webhook_auth="token:hook-secret"):
            pass
    message = str(refused.value)
    assert SMS in message
    assert "DLRHUB_SENT_SMS_REPORT_WEBHOOK_AUTH" in message
    assert GMS not in message
    assert "DLRHUB_GMS_WEBHOOK_AUTH" not in message
    assert not (tmp_path / "dlrhub.db").exists()


@pytest.mark.parametrize(
    "protection",
    [
        {"webhooks_open": True},
        {"gms_webhook_auth": "basic:gms:pw", "sent_sms_report_webhook_auth": "token:t"},
        {"webhook_allow_from": "127.0.0.0/8"},
        {"gms_webhook_auth": "basic:gms:pw", "sent_sms_report_webhook_allow_from": "127.0.0.1"},
    ],
)
async def test_with_tokens_it_starts_once_each_webhook_is_protected_or_declared_open(
    tmp_path: Path, protection: dict[str, Any]
) -> None:
    async with serving(tmp_path, tokens="ingest:t0ken-3", **protection) as running:
        assert running.http_port > 0


@pytest.mark.parametrize(
    ("setting", "bad"),
    [
        ("http_max_connections", 0),
        ("http_idle_timeout", 0.0),
        ("http_body_timeout", -1.0),
        ("log_repeat_interval", 0.0),
    ],
)
async def test_limits_that_would_stop_the_port_are_refused(tmp_path: Path, setting: str, bad: float) -> None:
    settings: dict[str, Any] = {setting: bad}
    with pytest.raises(ValueError, match=f"^DLRHUB_{setting.upper()} must be"):
        async with serving(tmp_path, **settings):
            pass
    assert not (tmp_path / "dlrhub.db").exists()


# --- the admin port -----------------------------------------------------------------------------


async def test_metrics_are_on_the_admin_port_only(tmp_path: Path) -> None:
    async with serving(tmp_path) as running, httpx.AsyncClient(timeout=TIMEOUT) as http:
        on_provider_port = await http.get(f"http://127.0.0.1:{running.http_port}/metrics")
        assert on_provider_port.status_code == 404
        assert "dlrhub_" not in on_provider_port.text
        samples = await scrape(running.admin_port)
        assert value(samples, "dlrhub_http_max_connections") == 1000
        # The admin port serves no webhook.
        admin_url = f"http://127.0.0.1:{running.admin_port}{GMS}"
        on_admin_port = await http.post(admin_url, content=gms_batch("a-1"))
        assert on_admin_port.status_code == 404
        assert running.store.latest_cursor() == 0


async def test_the_admin_port_is_off_by_default(tmp_path: Path) -> None:
    async with serving(tmp_path, admin_listen="") as running, httpx.AsyncClient(timeout=TIMEOUT) as http:
        assert running.admin_port is None
        assert (await http.get(f"http://127.0.0.1:{running.http_port}/metrics")).status_code == 404
        assert (
            await http.post(f"http://127.0.0.1:{running.http_port}{GMS}", content=gms_batch("b-1"))
        ).status_code == 200


# --- source-address allow lists -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("lists", "expected"),
    [
        ({"webhook_allow_from": "10.0.0.0/8,2001:db8::/32"}, {GMS: 403, SMS: 403, SMS_VIBER: 403}),
        ({"webhook_allow_from": "10.0.0.0/8, 127.0.0.0/8"}, {GMS: 200, SMS: 200, SMS_VIBER: 200}),
        # A route's own list replaces the common one; a channel route has its parent's.
        (
            {"webhook_allow_from": "10.0.0.0/8", "gms_webhook_allow_from": "127.0.0.1"},
            {GMS: 200, SMS: 403, SMS_VIBER: 403},
        ),
        (
            {"webhook_allow_from": "10.0.0.0/8", "sent_sms_report_webhook_allow_from": "127.0.0.1"},
            {GMS: 403, SMS: 200, SMS_VIBER: 200},
        ),
    ],
)
async def test_a_post_from_outside_the_allow_list_gets_403_and_nothing_is_stored(
    tmp_path: Path, lists: dict[str, Any], expected: dict[str, int]
) -> None:
    async with (
        serving(tmp_path, **lists) as running,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}", timeout=TIMEOUT) as http,
    ):
        answers = {
            GMS: await http.post(GMS, content=gms_batch("from-1")),
            SMS: await http.post(SMS, content=ssr_payload(ssr("from-2"))),
            SMS_VIBER: await http.post(SMS_VIBER, content=ssr_payload(ssr("from-3"))),
        }
        assert {path: answer.status_code for path, answer in answers.items()} == expected
        for answer in answers.values():
            if answer.status_code == 403:
                assert answer.headers["Content-Type"].startswith("application/json")
                error = answer.json()["error"]
                assert (error["field"], error["reason"]) == ("", "ADDRESS_NOT_ALLOWED")
                assert "127.0.0.1" in error["description"]
        assert running.store.latest_cursor() == list(expected.values()).count(200)


async def test_the_allow_list_comes_before_the_credentials(tmp_path: Path) -> None:
    async with (
        serving(
            tmp_path,
            gms_webhook_auth="basic:gms:s3cret",
            gms_webhook_allow_from="127.0.0.1",
            sent_sms_report_webhook_auth="token:t0ken",
            sent_sms_report_webhook_allow_from="192.0.2.0/24",
        ) as running,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}", timeout=TIMEOUT) as http,
    ):
        # An allowed address still needs the credentials; a refused one is refused with them.
        assert (await http.post(GMS, content=gms_batch("both-1"))).status_code == 401
        assert (await http.post(GMS, content=gms_batch("both-2"), auth=("gms", "s3cret"))).status_code == 200
        for route in (SMS, SMS_VIBER, SMS + "/no-such-channel"):  # refused before its channel is looked up
            refused = await http.post(route, content=ssr_payload(ssr("both-3")), params={"token": "t0ken"})
            assert refused.status_code == 403
            assert "WWW-Authenticate" not in refused.headers
        assert running.store.latest_cursor() == 1


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("2001:db8::7", True),
        ("2001:db9::7", False),
        ("::ffff:10.9.9.9", True),  # an IPv4 client on a dual-stack socket
        ("::ffff:11.9.9.9", False),
        ("192.0.2.7", True),  # a single address
        ("192.0.2.8", False),
        ("fe80::1%eth0", False),
        ("not an address", False),
        ("", False),
        (None, False),
    ],
)
def test_allow_list_membership(peer: str | None, allowed: bool) -> None:
    allow_list = AllowList.parse("10.0.0.0/8, 2001:db8::/32,192.0.2.7")
    assert allow_list.allows(peer) is allowed


@pytest.mark.parametrize(
    ("setting", "spec"),
    [
        ("webhook_allow_from", "10.0.0.1/8"),  # host bits set: a typo for 10.0.0.0/8?
        ("gms_webhook_allow_from", "example.com"),
        ("sent_sms_report_webhook_allow_from", ","),
    ],
)
async def test_a_bad_allow_list_is_refused_naming_its_variable(
    tmp_path: Path, setting: str, spec: str
) -> None:
    variable = "DLRHUB_" + setting.upper()
    settings: dict[str, Any] = {setting: spec}
    with pytest.raises(ValueError, match=f"^{variable}: "):
        async with serving(tmp_path, **settings):
            pass
    assert not (tmp_path / "dlrhub.db").exists()


# --- time limits ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def quick(tmp_path: Path, **settings: Any) -> AsyncIterator[app.App]:
    """A server whose connections get half a second without a request head or a body."""
    async with serving(tmp_path, http_idle_timeout=0.5, http_body_timeout=0.5, **settings) as running:
        yield running


async def test_slow_headers_are_cut_off(tmp_path: Path) -> None:
    async with quick(tmp_path) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.http_port)
        writer.write(b"POST /webhooks/gms HTTP/1.1\r\nHost: dlrhub\r\n")
        started = time.monotonic()

        async def dribble() -> None:  # a header line every 100 ms, never the end of the head
            with contextlib.suppress(ConnectionError):
                for number in range(100):
                    writer.write(f"X-Slow-{number}: y\r\n".encode())
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dribbling = asyncio.create_task(dribble())
        try:
            answered = await closed_by_server(reader)
        finally:
            dribbling.cancel()
            writer.close()
        assert answered == b""  # closed without an answer: there was no request to answer
        assert 0.4 <= time.monotonic() - started < 5
        assert not dribbling.done() or dribbling.cancelled()


async def test_a_connection_that_sends_nothing_is_closed(tmp_path: Path) -> None:
    async with quick(tmp_path) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.http_port)
        started = time.monotonic()
        assert await closed_by_server(reader) == b""
        assert 0.4 <= time.monotonic() - started < 5
        writer.close()


async def test_an_idle_kept_alive_connection_is_closed_after_its_request(tmp_path: Path) -> None:
    async with quick(tmp_path) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.http_port)
        writer.write(post(GMS, gms_batch("kept-1"), keep_alive=True))
        status = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert status.startswith(b"HTTP/1.1 200")
        rest = await closed_by_server(reader)  # the rest of the answer, then the close
        assert b'"accepted": 1' in rest
        writer.close()
        assert running.store.latest_cursor() == 1


async def test_a_body_arriving_in_parts_is_read_whole_and_stored(tmp_path: Path) -> None:
    # The handler starts on the request head: the rest of the body is awaited (under the body timer).
    async with serving(tmp_path) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.http_port)
        request = post(GMS, gms_batch("parts-1"))
        writer.write(request[: -len(gms_batch("parts-1")) // 2])
        await writer.drain()
        await asyncio.sleep(0.2)  # pacing only: the handler is waiting for the rest by now
        writer.write(request[-len(gms_batch("parts-1")) // 2 :])
        answer = await closed_by_server(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert b'"accepted": 1' in answer
        assert running.store.latest_cursor() == 1


async def test_a_slow_body_gets_408_and_nothing_is_stored(tmp_path: Path) -> None:
    async with quick(tmp_path) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.http_port)
        body = gms_batch("slow-body-1")
        writer.write(post(GMS, body)[: -len(body) // 2])  # the head and half the body, then nothing
        answer = await closed_by_server(reader)
        writer.close()
        head, _, content = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        error = json.loads(content)["error"]
        assert error["reason"] == "BODY_TIMEOUT"
        assert "0.5 s" in error["description"]
        assert running.store.latest_cursor() == 0


# --- bounded connections --------------------------------------------------------------------------


async def wait_for_connections(running: app.App, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while value(await scrape(running.admin_port), "dlrhub_http_connections") != count:
        assert time.monotonic() < deadline, f"the webhook port never held {count} connections"
        await asyncio.sleep(0.05)


async def test_at_the_limit_a_new_connection_waits_until_one_closes(tmp_path: Path) -> None:
    async with serving(tmp_path, http_max_connections=3) as running:
        held = [await asyncio.open_connection("127.0.0.1", running.http_port) for _ in range(3)]
        await wait_for_connections(running, 3)
        samples = await scrape(running.admin_port)
        assert value(samples, "dlrhub_http_max_connections") == 3

        reader, writer = await asyncio.open_connection("127.0.0.1", running.http_port)  # the kernel queues it
        writer.write(post(GMS, gms_batch("waiting-1")))
        with pytest.raises(TimeoutError):  # not accepted while the three are open
            await asyncio.wait_for(reader.read(1), 0.5)
        assert running.store.latest_cursor() == 0

        _, first = held.pop()
        first.close()  # a slot frees up: the waiting connection is accepted and answered
        answer = await closed_by_server(reader)
        assert answer.startswith(b"HTTP/1.1 200")
        assert running.store.latest_cursor() == 1
        for _, other in held:
            other.close()
        writer.close()


async def test_a_stalled_tls_handshake_holds_a_slot_only_until_the_idle_timeout(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    async with serving(
        tmp_path,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        http_max_connections=1,
        http_idle_timeout=0.5,
    ) as running:
        # A connection that never starts its TLS handshake takes the one slot (the kernel hands
        # connections over in order: it is accepted first).
        stalled_reader, stalled = await asyncio.open_connection("127.0.0.1", running.http_port)
        started = time.monotonic()
        trusting = ssl.create_default_context(cafile=certs.ca)
        async with httpx.AsyncClient(verify=trusting, timeout=TIMEOUT) as http:
            url = f"https://localhost:{running.http_port}{GMS}"
            answer = await http.post(url, content=gms_batch("tls-1"))
        assert answer.status_code == 200
        assert time.monotonic() - started >= 0.3  # it waited for the stalled handshake to be dropped
        assert await closed_by_server(stalled_reader) == b""
        stalled.close()


def test_the_connection_limit_follows_the_open_file_limit(tmp_path: Path) -> None:
    """With little room under the open-file limit, fewer webhook connections than configured."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for this process's own files and a server, and for 40 webhook connections.
    low = max(len(os.listdir("/proc/self/fd")) + 100, FILE_RESERVE) + 40
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:

        async def limit() -> float:
            async with serving(tmp_path) as running:
                return value(await scrape(running.admin_port), "dlrhub_http_max_connections")

        assert asyncio.run(limit()) == low - FILE_RESERVE
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_RESERVE, hard))
        settings = Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "low.db")
        with pytest.raises(ValueError, match=f"the open-file limit \\(ulimit -n\\) is {FILE_RESERVE}"):
            asyncio.run(app.start(settings, clock=FakeClock()))
        assert not (tmp_path / "low.db").exists()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_serve_raises_its_open_file_limit_to_the_hard_limit(db_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = max(FILE_RESERVE + 64, hard // 2)
    assert low < hard, f"the hard open-file limit ({hard}) leaves no room to test raising"
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # the server process inherits it
    try:
        server = launcher.start(db_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with server:
        assert resource.prlimit(server.pid, resource.RLIMIT_NOFILE) == (hard, hard)
        assert (server.ready["open_files_limit"], server.ready["open_files_hard_limit"]) == (hard, hard)


# --- a flood of connections against a real `dlrhub serve` -----------------------------------------

LIMIT = 20
HEADROOM = 40  # file descriptors left for gRPC, the database readers and this test's calls
IDLE = 60
SLOW = 30


@pytest.fixture
def flooded_server(db_path: Path) -> Iterator[launcher.Server]:
    env = {**os.environ, "DLRHUB_HTTP_MAX_CONNECTIONS": str(LIMIT), "DLRHUB_HTTP_IDLE_TIMEOUT": "1"}
    with launcher.start(db_path, env=env) as server:
        yield server


async def test_a_flood_of_connections_leaves_grpc_and_the_webhooks_working(
    flooded_server: launcher.Server,
) -> None:
    server = flooded_server
    pid = server.pid
    # The process now runs close to its open-file limit: room for LIMIT webhook connections and
    # HEADROOM more, far fewer than the flood. Unbounded, the flood would take them all.
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + LIMIT + HEADROOM,) * 2)
    http_host, _, http_port = server.http_address.rpartition(":")

    async def idle() -> asyncio.StreamWriter:
        _, writer = await asyncio.open_connection(http_host, int(http_port))
        return writer

    async def slow_headers() -> asyncio.StreamWriter:
        _, writer = await asyncio.open_connection(http_host, int(http_port))
        writer.write(b"POST /webhooks/gms HTTP/1.1\r\nHost: dlrhub\r\n")

        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                for number in range(200):
                    writer.write(f"X-Slow-{number}: y\r\n".encode())
                    await writer.drain()
                    await asyncio.sleep(0.2)

        dribbling.append(asyncio.create_task(dribble()))
        return writer

    dribbling: list[asyncio.Task[None]] = []
    flood = await asyncio.gather(*(idle() for _ in range(IDLE)), *(slow_headers() for _ in range(SLOW)))
    assert len(flood) > LIMIT + HEADROOM  # more than the process could hold
    try:
        samples = await scrape(server.admin_port)  # the admin port is a listener of its own
        assert value(samples, "dlrhub_http_max_connections") == LIMIT
        assert value(samples, "dlrhub_http_connections") <= LIMIT

        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = DeliveryReportServiceStub(channel)
            ingested = await stub.Ingest(IngestRequest(payload=gms_batch("flood-grpc-1")), timeout=TIMEOUT)
            assert ingested.accepted_count == 1
            fetched = await stub.GetMessage(GetMessageRequest(message_id="flood-grpc-1"), timeout=TIMEOUT)
            assert [r.message_id for r in fetched.messages] == ["flood-grpc-1"]

            # The provider's POST waits its turn behind the flood, whose connections the idle
            # timeout closes LIMIT at a time.
            async with httpx.AsyncClient(timeout=60) as http:
                url = f"http://{server.http_address}{GMS}"
                answer = await http.post(url, content=gms_batch("flood-hook-1"))
            assert answer.status_code == 200
            assert answer.json()["accepted"] == 1
            fetched = await stub.GetMessage(GetMessageRequest(message_id="flood-hook-1"), timeout=TIMEOUT)
            assert [r.message_id for r in fetched.messages] == ["flood-hook-1"]
    finally:
        for task in dribbling:
            task.cancel()
        for writer in flood:
            writer.close()

    assert server.stop() == 0
    entries = [json.loads(line) for line in server.output.stderr if line.startswith("{")]
    assert len(entries) < 20, f"{len(entries)} log lines: {entries}"
    loud = [entry for entry in entries if entry["level"] in ("WARNING", "ERROR")]
    assert {entry["message"] for entry in loud} == {
        "HTTP connections at the limit: new ones wait to be accepted"
    }
    assert len([entry for entry in loud if "repeated" not in entry]) == 1
    assert "Too many open files" not in json.dumps(entries)


async def test_a_webhook_address_in_use_stops_start_up(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match="Address already in use"):
            async with serving(tmp_path, http_listen=f"127.0.0.1:{busy.getsockname()[1]}"):
                pass
