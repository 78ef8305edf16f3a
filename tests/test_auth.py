"""Bearer tokens with roles on the gRPC API, against the real server (grpc.aio, in-process).

Tokens come from Settings.tokens ("ROLES:TOKEN,...") or a tokens_file (JSON); every behaviour is
checked with both. Callers go through the real client (dlrhub_client.AsyncClient), the real
`dlrhub` CLI (a subprocess) and the real grpcurl binary (for reflection).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deliveryreport.v1 import delivery_report_service_pb2
from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, IngestRequest, StreamResponse
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub import app
from dlrhub.config import Settings
from dlrhub.transport import auth
from dlrhub.transport.auth import Tokens
from dlrhub_client import (
    AsyncClient,
    DlrhubClientError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from dlrhub_client.errors import from_rpc_error
from tests.conftest import FakeClock, serving
from tests.helpers import TIMEOUT, connect, gms_batch, run

INGEST_TOKEN = "ingest-token-5f0c9a1d"
READ_TOKEN = "read-token-7b2e4c88"
BOTH_TOKEN = "both-token-c3d91e07"
SPEC = f"ingest:{INGEST_TOKEN}, read:{READ_TOKEN}, ingest+read:{BOTH_TOKEN}"
SERVICE = delivery_report_service_pb2.DESCRIPTOR.services_by_name["DeliveryReportService"]
BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=str(BIN)) or "grpcurl"
DLRHUB = shutil.which("dlrhub", path=str(BIN)) or "dlrhub"


def write_tokens_file(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"tokens": entries}))
    return path


@pytest.fixture(params=["tokens", "tokens_file"])
async def secured(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[app.App]:
    """The server with three tokens (ingest, read, ingest+read), from the spec or from a JSON file."""
    if request.param == "tokens":
        settings: dict[str, Any] = {"tokens": SPEC}
    else:
        entries = [
            {"name": "ingester", "token": INGEST_TOKEN, "roles": ["ingest"]},
            {"name": "reader", "token": READ_TOKEN, "roles": ["read"]},
            {"name": "both", "token": BOTH_TOKEN, "roles": ["ingest", "read"]},
        ]
        settings = {"tokens_file": write_tokens_file(tmp_path / "tokens.json", entries)}
    async with serving(tmp_path, webhooks_open=True, **settings) as running:
        yield running


async def first_change(client: AsyncClient) -> StreamResponse:
    """The first change of a Stream from the beginning (heartbeats skipped)."""
    stream = cast(AsyncGenerator[StreamResponse, None], client.stream(from_beginning=True))
    try:
        async with asyncio.timeout(TIMEOUT):
            async for response in stream:
                return response
    finally:
        await stream.aclose()
    raise AssertionError("the stream ended without a change")


async def assert_nothing_stored(running: app.App, message_id: str) -> None:
    assert running.store.latest_cursor() == 0
    async with connect(running, token=BOTH_TOKEN) as client:
        with pytest.raises(NotFoundError):
            await client.get_message(message_id)


# Authentication and roles.


async def test_no_token_is_unauthenticated_for_every_method(secured: app.App) -> None:
    async with connect(secured, token=None) as client:
        with pytest.raises(UnauthenticatedError) as ingest:
            await client.ingest(gms_batch("anon-1"))
        with pytest.raises(UnauthenticatedError) as fetch:
            await client.get_message("anon-1")
        with pytest.raises(UnauthenticatedError) as stream:
            await first_change(client)
    for error in (ingest.value, fetch.value, stream.value):
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert error.reason == "MISSING_TOKEN"
        assert "Bearer" in error.message
    await assert_nothing_stored(secured, "anon-1")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer ", "Token " + INGEST_TOKEN, INGEST_TOKEN])
async def test_an_authorization_header_without_a_bearer_token_is_missing_token(
    secured: app.App, header: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = DeliveryReportServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Ingest(
                IngestRequest(payload=gms_batch("header-1")),
                metadata=(("authorization", header),),
                timeout=TIMEOUT,
            )
    error = from_rpc_error(raised.value)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == "MISSING_TOKEN"
    await assert_nothing_stored(secured, "header-1")


@pytest.mark.parametrize(
    "token", ["not-a-configured-token", INGEST_TOKEN[:-1], BOTH_TOKEN + "x", READ_TOKEN.upper()]
)
async def test_an_unknown_token_is_unauthenticated_for_every_method(secured: app.App, token: str) -> None:
    async with connect(secured, token=token) as client:
        with pytest.raises(UnauthenticatedError) as ingest:
            await client.ingest(gms_batch("stranger-1"))
        with pytest.raises(UnauthenticatedError) as fetch:
            await client.get_message("stranger-1")
        with pytest.raises(UnauthenticatedError) as stream:
            await first_change(client)
    for error in (ingest.value, fetch.value, stream.value):
        assert error.reason == "UNKNOWN_TOKEN"
        assert token not in error.message  # the server does not echo secrets
    await assert_nothing_stored(secured, "stranger-1")


async def test_a_read_token_may_not_ingest_and_nothing_is_stored(secured: app.App) -> None:
    async with connect(secured, token=READ_TOKEN) as client:
        with pytest.raises(PermissionDeniedError) as raised:
            await client.ingest(gms_batch("denied-1"))
    error = raised.value
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "MISSING_ROLE"
    assert error.metadata == {"method": "Ingest", "role": "ingest"}
    assert "Ingest" in error.message
    await assert_nothing_stored(secured, "denied-1")


async def test_an_ingest_token_may_not_get_list_or_stream(secured: app.App) -> None:
    async with connect(secured, token=INGEST_TOKEN) as client:
        response = await client.ingest(gms_batch("written-1"))
        assert response.accepted_count == 1
        with pytest.raises(PermissionDeniedError) as get:
            await client.get_message("written-1")
        with pytest.raises(PermissionDeniedError) as listed:
            await client.list_messages(reference="ref-written-1")
        with pytest.raises(PermissionDeniedError) as stream:
            await first_change(client)
    assert get.value.reason == listed.value.reason == stream.value.reason == "MISSING_ROLE"
    assert get.value.metadata == {"method": "GetMessage", "role": "read"}
    assert listed.value.metadata == {"method": "ListMessages", "role": "read"}
    assert stream.value.metadata == {"method": "StreamBatches", "role": "read"}  # what the client follows


async def test_each_role_does_its_part_and_both_roles_do_both(secured: app.App) -> None:
    async with connect(secured, token=INGEST_TOKEN) as ingester, connect(secured, token=READ_TOKEN) as reader:
        assert (await ingester.ingest(gms_batch("split-1"))).accepted_count == 1
        [state] = (await reader.get_message("split-1")).messages
        assert state.message_id == "split-1"
        assert (await first_change(reader)).change.report.message_id == "split-1"
    async with connect(secured, token=BOTH_TOKEN) as client:
        assert (await client.ingest(gms_batch("both-1"))).accepted_count == 1
        [state] = (await client.get_message("both-1")).messages
        assert state.message_id == "both-1"
        assert (await first_change(client)).change.report.message_id == "split-1"


async def test_the_lowercase_bearer_scheme_is_accepted(secured: app.App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = DeliveryReportServiceStub(channel)
        metadata = (("authorization", f"bearer {BOTH_TOKEN}"),)
        await stub.Ingest(IngestRequest(payload=gms_batch("lower-1")), metadata=metadata, timeout=TIMEOUT)
        response = await stub.GetMessage(
            GetMessageRequest(message_id="lower-1"), metadata=metadata, timeout=TIMEOUT
        )
    assert [r.message_id for r in response.messages] == ["lower-1"]


async def test_tokens_from_the_spec_and_the_file_are_both_accepted(tmp_path: Path) -> None:
    tokens_file = write_tokens_file(tmp_path / "tokens.json", [{"token": READ_TOKEN, "roles": ["read"]}])
    async with (
        serving(
            tmp_path, tokens=f"ingest:{INGEST_TOKEN}", tokens_file=tokens_file, webhooks_open=True
        ) as running,
        connect(running, token=INGEST_TOKEN) as ingester,
        connect(running, token=READ_TOKEN) as reader,
    ):
        assert (await ingester.ingest(gms_batch("mixed-1"))).accepted_count == 1
        assert [r.message_id for r in (await reader.get_message("mixed-1")).messages] == ["mixed-1"]
        with pytest.raises(PermissionDeniedError):
            await reader.ingest(gms_batch("mixed-2"))


async def test_without_tokens_everything_is_open(tmp_path: Path) -> None:
    async with serving(tmp_path) as running:
        for token in (None, "any-token-at-all"):
            async with connect(running, token=token) as client:
                message_id = f"open-{token}"
                assert (await client.ingest(gms_batch(message_id))).accepted_count == 1
                assert [r.message_id for r in (await client.get_message(message_id)).messages] == [message_id]
                assert (await first_change(client)).change.report.message_id == "open-None"


# Open services: health and reflection.


async def test_health_check_needs_no_token(secured: app.App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE.full_name):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_no_token(secured: app.App) -> None:
    code, out, err = await run(GRPCURL, "-plaintext", f"127.0.0.1:{secured.port}", "list")
    assert code == 0, err
    assert SERVICE.full_name in out.split()
    assert "grpc.health.v1.Health" in out.split()
    code, out, err = await run(
        GRPCURL, "-plaintext", f"127.0.0.1:{secured.port}", "describe", SERVICE.full_name
    )
    assert code == 0, err
    assert "rpc Ingest" in out


async def test_reflection_turned_off_is_not_served(tmp_path: Path) -> None:
    async with serving(tmp_path, tokens=SPEC, reflection=False, webhooks_open=True) as running:
        code, out, err = await run(GRPCURL, "-plaintext", f"127.0.0.1:{running.port}", "list")
        assert code != 0
        assert "server does not support the reflection API" in err
        assert SERVICE.full_name not in out
        async with connect(running, token=BOTH_TOKEN) as client:  # the service itself is still served
            assert (await client.ingest(gms_batch("no-reflection-1"))).accepted_count == 1


def test_every_method_of_the_service_has_a_role() -> None:
    methods = {f"/{SERVICE.full_name}/{method.name}" for method in SERVICE.methods}
    assert methods, "the descriptor lists no methods"
    missing = methods - set(auth.METHOD_ROLES)
    assert not missing, f"methods without a role in auth.METHOD_ROLES: {sorted(missing)}"
    assert set(auth.METHOD_ROLES) == methods, "METHOD_ROLES names methods the service does not have"
    assert set(auth.METHOD_ROLES.values()) <= auth.ROLES
    assert not any(method.startswith(auth.OPEN_PREFIXES) for method in methods)


# Configuration: Tokens.parse and Tokens.load.


def test_parse_gives_each_token_its_roles() -> None:
    tokens = Tokens.parse(f" ingest : {INGEST_TOKEN} ,read:{READ_TOKEN},, ingest+read:{BOTH_TOKEN},")
    assert tokens.roles_of(INGEST_TOKEN) == frozenset({"ingest"})
    assert tokens.roles_of(READ_TOKEN) == frozenset({"read"})
    assert tokens.roles_of(BOTH_TOKEN) == frozenset({"ingest", "read"})
    assert len(tokens.tokens) == 3
    assert Tokens.parse("").tokens == ()
    assert Tokens.parse(" , ").tokens == ()


@pytest.mark.parametrize(
    "candidate",
    ["", INGEST_TOKEN[:-1], INGEST_TOKEN[:1], INGEST_TOKEN + "0", " " + READ_TOKEN, BOTH_TOKEN.upper()],
)
def test_roles_of_an_unconfigured_token_is_none(candidate: str) -> None:
    assert Tokens.parse(SPEC).roles_of(candidate) is None


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("owner:secret-1", "unknown role 'owner'"),
        ("ingest+owner:secret-1", "unknown role 'owner'"),
        ("Read:secret-1", "unknown role 'Read'"),
        ("ingest+:secret-1", "unknown role ''"),
        ("ingest:", "secret is empty"),
        ("ingest:   ", "secret is empty"),
        (f"read:{READ_TOKEN},ingest:", "token 2: the secret is empty"),
        ("secret-without-roles", "expected ROLES:TOKEN"),
    ],
)
def test_parse_rejects_a_bad_spec_naming_the_problem(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=r"^token ") as raised:
        Tokens.parse(spec)
    assert problem in str(raised.value)
    assert "secret-1" not in str(raised.value)  # no secret in error messages


def test_load_reads_names_tokens_and_roles(tmp_path: Path) -> None:
    path = write_tokens_file(
        tmp_path / "tokens.json",
        [
            {"name": "billing", "token": READ_TOKEN, "roles": ["read"]},
            {"token": BOTH_TOKEN, "roles": ["read", "ingest"]},
        ],
    )
    tokens = Tokens.load(path)
    assert [token.name for token in tokens.tokens] == ["billing", ""]
    assert tokens.roles_of(READ_TOKEN) == frozenset({"read"})
    assert tokens.roles_of(BOTH_TOKEN) == frozenset({"ingest", "read"})
    assert tokens.roles_of(INGEST_TOKEN) is None
    assert tokens.roles_of(READ_TOKEN[:-1]) is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "expected"),
        ("[]", "expected"),
        ('{"token": "x"}', "expected"),
        ('{"tokens": ["secret-1"]}', "expected"),
        ('{"tokens": [{"roles": ["read"]}]}', "expected"),
        ('{"tokens": [{"token": "secret-1"}]}', "expected"),
        ('{"tokens": [{"name": "ops", "token": "secret-1", "roles": ["root"]}]}', "ops: unknown role 'root'"),
        ('{"tokens": [{"name": "ops", "token": "secret-1", "roles": "read"}]}', "ops: needs a list of roles"),
        ('{"tokens": [{"name": "ops", "token": "secret-1", "roles": []}]}', "ops: needs a list of roles"),
        ('{"tokens": [{"name": "ops", "token": "", "roles": ["read"]}]}', "ops: the secret is empty"),
        ('{"tokens": [{"name": "ops", "token": 12345, "roles": ["read"]}]}', "ops: the secret is empty"),
    ],
)
def test_load_rejects_a_bad_file_naming_the_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(problem)) as raised:
        Tokens.load(path)
    if problem == "expected":
        assert str(path) in str(raised.value)
    assert "secret-1" not in str(raised.value)


@pytest.mark.parametrize(
    "settings",
    [{"tokens": "owner:secret-1"}, {"tokens": "ingest:"}],
)
async def test_start_refuses_bad_tokens_before_serving(tmp_path: Path, settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="token 1"):
        await app.start(
            Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "x.db", **settings),
            clock=FakeClock(),
        )
    assert not (tmp_path / "x.db").exists()


async def test_start_refuses_a_bad_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"tokens": [{"token": "secret-1", "roles": ["root"]}]}')
    with pytest.raises(ValueError, match="unknown role 'root'"):
        await app.start(
            Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", db=tmp_path / "x.db", tokens_file=path),
            clock=FakeClock(),
        )


# The client and the CLI send the token.


async def test_the_cli_sends_the_token_from_the_environment(secured: app.App) -> None:
    async with connect(secured, token=INGEST_TOKEN) as client:
        assert (await client.ingest(gms_batch("cli-1"))).accepted_count == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLRHUB_")}
    command = (DLRHUB, "fetch", "--message-id", "cli-1", "--target", f"127.0.0.1:{secured.port}", "--json")

    code, out, err = await run(*command, env={**env, "DLRHUB_TOKEN": READ_TOKEN})
    assert code == 0, err
    [line] = out.splitlines()
    assert json.loads(line)["message_id"] == "cli-1"

    code, out, err = await run(*command, env=env)
    assert code != 0
    assert "UNAUTHENTICATED" in err
    assert "missing token" in err
    assert "cli-1" not in out

    code, out, err = await run(*command, "--token", INGEST_TOKEN, env={**env, "DLRHUB_TOKEN": READ_TOKEN})
    assert code != 0  # --token wins over the environment, and an ingest token may not fetch
    assert "PERMISSION_DENIED" in err


async def test_a_client_error_is_a_dlrhub_client_error(secured: app.App) -> None:
    async with connect(secured, token=None) as client:
        with pytest.raises(DlrhubClientError, match=r"UNAUTHENTICATED: .*\[MISSING_TOKEN\]"):
            await client.get_message("x")
