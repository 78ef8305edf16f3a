"""Hostile input through Ingest (gRPC) and the webhooks: the answer is a clean rejection, never a crash.

Generated (hypothesis) and hand-made payloads: deep nesting, huge and odd numbers, NaN and Infinity,
every field of both formats with every wrong type, invalid UTF-8 (webhooks; and, built by hand, in
the protobuf strings of an IngestRequest), multi-megabyte strings, unicode message ids (emoji,
right-to-left marks, NUL, lone surrogates written as JSON escapes) and mutations of the valid
examples (character and byte flips, truncations, deleted fields, swapped types).

Properties, for every request:
- gRPC answers OK or INVALID_ARGUMENT (with google.rpc details), never INTERNAL or UNKNOWN; HTTP
  answers 200 or 400 (413 over the body limit) with a JSON body, never 500;
- whatever is acknowledged as stored can be fetched by its message id;
- the server stays up: a health Check and a valid Ingest succeed after every example;
- messages stored before are untouched: hostile payloads carry other message ids, so the state and
  history of the pre-ingested messages must stay exactly as they were.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from deliveryreport.v1.delivery_report_pb2 import Source
from deliveryreport.v1.delivery_report_service_pb2 import (
    Format,
    GetMessageRequest,
    GetMessageResponse,
    IngestOutcome,
    IngestRequest,
    IngestResponse,
)
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from deliveryreport.v1.provider_formats_pb2 import (
    GmsReport,
    GmsReports,
    SentSmsReport,
    SentSmsReportError,
    SentSmsReportPlatform,
    SentSmsReportPrice,
    SentSmsReports,
    SentSmsReportStatus,
)
from dlrhub.config import Settings
from tests.conftest import FIXTURES, FakeClock, Running, serving
from tests.helpers import TIMEOUT, ErrorDetails, details_of

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceAsyncStub

HTTP_TIMEOUT = 30.0
GMS_ROUTE = "/webhooks/gms"
SMS_ROUTE = "/webhooks/sent-sms-report"
INGEST_METHOD = "/deliveryreport.v1.DeliveryReportService/Ingest"
ITEM_REASONS = {"MISSING_FIELD", "WRONG_TYPE", "INVALID_VALUE", "ITEM_TOO_LARGE"}
# The valid provider examples (and the seed's malformed one), the starting points of mutations.
SEED_TEXTS = [path.read_text() for path in sorted(FIXTURES.glob("*.json"))]
HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

Json: TypeAlias = Any  # a decoded-JSON-like value, possibly holding Raw tokens


class Raw:
    """A JSON token written exactly as given: 1e400, -0, NaN, a 5000-digit integer..."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:30]!r}{'...' if len(self.text) > 30 else ''})"


def dump(value: Json, *, ascii_only: bool = True) -> str:
    """JSON text of `value`, Raw tokens verbatim; floats nan/inf come out as NaN/Infinity."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        members = (
            f"{json.dumps(str(k), ensure_ascii=ascii_only)}:{dump(v, ascii_only=ascii_only)}"
            for k, v in value.items()
        )
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only=ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


GMS_TEMPLATE: dict[str, Json] = {
    "number": 380961111111,
    "time": 1477417294667,
    "status": 2,
    "substatus": 23,
    "hyber_status": 23011,
    "message_id": "template",
    "extra_id": "AD-6640-7006",
    "sent_via": "sms",
    "total_sms_parts": 1,
    "delivered_sms_parts": 1,
    "matching_template_id": 6349599,
    "status_text": "delivered",
    "error_code": 0,
    "error_text": "",
    "phone_number": "380961111111",
    "last_partner": "sms",
    "delivered_via": "sms",
}
SMS_TEMPLATE: dict[str, Json] = {
    "bulkId": "BULK-ID-123-xyz",
    "messageId": "template",
    "to": "41793026727",
    "from": "InfoSMS",
    "sender": "InfoSMS",
    "sentAt": "2019-11-09T16:00:00.000+0000",
    "doneAt": "2019-11-09T16:00:00.000+0000",
    "smsCount": 1,
    "messageCount": 1,
    "mccMnc": "22801",
    "callbackData": "callback",
    "price": {"pricePerMessage": Raw("0.01"), "currency": "EUR"},
    "status": {
        "groupId": 3,
        "groupName": "DELIVERED",
        "id": 5,
        "name": "DELIVERED_TO_HANDSET",
        "description": "Message delivered to handset",
        "action": "",
    },
    "error": {
        "groupId": 1,
        "groupName": "HANDSET_ERRORS",
        "id": 7,
        "name": "EC_ABSENT_SUBSCRIBER",
        "description": "absent",
        "permanent": False,
    },
    "entityId": "entity",
    "applicationId": "application",
    "platform": {"entityId": "entity", "applicationId": "application"},
    "channel": "SMS",
}
SMS_SEEN_TEMPLATE: dict[str, Json] = {
    "messageId": "template",
    "to": "41793026727",
    "seenAt": "2019-11-09T16:05:00.000+0000",
    "channel": "VIBER",
}


def field_paths(template: dict[str, Json]) -> list[tuple[str, ...]]:
    """Every field of a template, nested objects' fields too."""
    paths: list[tuple[str, ...]] = []
    for key, value in template.items():
        paths.append((key,))
        if isinstance(value, dict):
            paths.extend((key, inner) for inner in value)
    return paths


def set_path(item: dict[str, Json], path: tuple[str, ...], value: Json) -> None:
    target = item
    for key in path[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[path[-1]] = value


def delete_path(item: dict[str, Json], path: tuple[str, ...]) -> None:
    target: Json = item
    for key in path[:-1]:
        target = target.get(key) if isinstance(target, dict) else None
    if isinstance(target, dict):
        target.pop(path[-1], None)


def gms_item(message_id: str) -> dict[str, Json]:
    return {**copy.deepcopy(GMS_TEMPLATE), "message_id": message_id}


def sms_item(message_id: str) -> dict[str, Json]:
    return {**copy.deepcopy(SMS_TEMPLATE), "messageId": message_id}


# Pre-ingested before any hostile input; no generated payload carries these ids.
PRE_GMS = [gms_item("pre:gms:1"), {**gms_item("pre:gms:2"), "status": 3, "substatus": 35}]
PRE_SMS = sms_item("pre:sms:1")
PRE_SEEN = {**SMS_SEEN_TEMPLATE, "messageId": "pre:sms:1"}
PRE_IDS = ("pre:gms:1", "pre:gms:2", "pre:sms:1")


def not_pre(text: str) -> bool:
    return not text.startswith("pre:")


# Strategies.

NUMBER_TOKENS = [
    "1e400",
    "-1e400",
    "1E999999999",
    "-1E999999999",
    "1E-999999999",
    "0E999999999",
    "-0",
    "-0.0",
    "0.5",
    "1.0",
    "1e18",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "123456789012345678901234567890",
]
# Unusable anywhere in a payload: the whole payload is rejected as invalid JSON.
INVALID_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "nan",
    "inf",
    "1" + "0" * 5000,
    "01",
    "1.",
    ".5",
    "+1",
    "0x10",
]
SPECIAL_CHARACTERS = [
    "\x00",
    "\u202e",
    "\u200f",
    "\u0627",
    "\u05d0",
    "\U0001f600",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "\u0301",
]
characters = st.characters(codec="utf-8") | st.sampled_from(SPECIAL_CHARACTERS)
lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.text(characters | lone_surrogates, max_size=20)
json_leaves: st.SearchStrategy[Json] = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
    | st.sampled_from(NUMBER_TOKENS).map(Raw)
)
json_values: st.SearchStrategy[Json] = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
# Mostly the three formats; now and then a value the enum does not have (proto3 enums are open).
KNOWN_FORMATS = [Format.FORMAT_UNSPECIFIED, Format.FORMAT_GMS, Format.FORMAT_SENT_SMS_REPORT]
formats: st.SearchStrategy[int] = st.sampled_from([*KNOWN_FORMATS, *KNOWN_FORMATS, 3, -1, 2**31 - 1])


def objects_in(value: Json) -> list[dict[str, Json]]:
    """Every JSON object inside a decoded value, outermost first."""
    found: list[dict[str, Json]] = []
    pending = [value]
    while pending:
        current = pending.pop(0)
        if isinstance(current, dict):
            found.append(current)
            pending.extend(current.values())
        elif isinstance(current, list):
            pending.extend(current)
    return found


@st.composite
def hostile_reports(draw: st.DrawFn) -> tuple[str, str]:
    """(route, payload): a report of either format with some fields deleted, retyped or added."""
    kind = draw(st.sampled_from(["gms", "sms", "seen"]))
    message_id = f"hx:{draw(st.integers(0, 10**9))}"
    item = gms_item(message_id) if kind == "gms" else sms_item(message_id)
    if kind == "seen":
        item = {**SMS_SEEN_TEMPLATE, "messageId": message_id}
    paths = field_paths(item)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        path = draw(st.sampled_from(paths))
        if action == "replace":
            set_path(item, path, draw(json_values))
        elif action == "delete":
            delete_path(item, path)
        else:
            set_path(item, (draw(texts),), draw(json_values))
    for id_key in ("message_id", "messageId"):
        value = item.get(id_key)
        assume(not isinstance(value, str) or not_pre(value))
    if kind == "gms":
        batch = draw(st.sampled_from(["single", "batch"]))
        body: Json = item if batch == "single" else [item, gms_item(f"{message_id}:b")]
        return GMS_ROUTE, dump(body)
    wrapper = draw(st.sampled_from(["results", "results", "hostile"]))
    body = {"results": [item]} if wrapper == "results" else {"results": draw(json_values)}
    return SMS_ROUTE, dump(body)


@st.composite
def mutated_seeds(draw: st.DrawFn) -> str:
    """A provider example (valid, or the seed's malformed one) with fields deleted, retyped or wrapped,
    and characters flipped, inserted, cut or repeated."""
    text = draw(st.sampled_from(SEED_TEXTS))
    structural = draw(st.booleans())
    if structural:
        try:
            value = json.loads(text, parse_float=Raw, parse_int=Raw)
        except ValueError:  # the malformed example: only its characters can be mutated
            structural = False
    if structural:
        for _ in range(draw(st.integers(1, 4))):
            target = draw(st.sampled_from(objects_in(value)))
            if not target:
                continue
            key = draw(st.sampled_from(sorted(target)))
            operation = draw(st.sampled_from(["delete", "retype", "wrap"]))
            if operation == "delete":
                del target[key]
            elif operation == "retype":
                target[key] = draw(json_values)
            else:
                target[key] = [target[key]]
        text = dump(value, ascii_only=draw(st.booleans()))
        if not is_utf8(text):
            text = dump(value)
    snippets = st.sampled_from(
        [
            *'{}[]",:\\-+.eE0123456789 \n',
            "null",
            "true",
            "1e400",
            "NaN",
            "\\u0000",
            "\\ud800",
            *SPECIAL_CHARACTERS,
        ]
    )
    for _ in range(draw(st.integers(0, 2) if structural else st.integers(1, 6))):
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        if operation == "flip":
            text = text[:at] + draw(snippets) + text[at + 1 :]
        elif operation == "insert":
            text = text[:at] + draw(snippets) + text[at:]
        elif operation == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)) :]
        elif operation == "truncate":
            text = text[:at]
        else:
            end = at + draw(st.integers(1, 60))
            text = text[:end] + text[at:end] * draw(st.integers(1, 5)) + text[end:]
    assume("pre:" not in text)
    return text


INVALID_UTF8 = [
    b"\x80",
    b"\xbf",
    b"\xc0\xaf",
    b"\xc1\xbf",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf5",
    b"\xfe",
    b"\xff",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
]


@st.composite
def mutated_seed_bytes(draw: st.DrawFn) -> bytes:
    """Mutated examples as bytes, with invalid UTF-8 sequences and random bytes spliced in; or noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    body = bytearray(draw(mutated_seeds()).encode())
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(body)))
        chunk = draw(st.sampled_from(INVALID_UTF8) | st.binary(min_size=1, max_size=3))
        if draw(st.booleans()):
            body[at:at] = chunk
        else:
            body[at : at + len(chunk)] = chunk
    return bytes(body)


# The server under attack.


def note(outcome: str) -> None:
    """Counts an outcome in hypothesis' statistics (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(outcome)


@dataclass
class Target:
    server: Running
    http: httpx.AsyncClient
    snapshot: dict[str, GetMessageResponse]
    alive_count: int = 0

    @property
    def stub(self) -> DeliveryReportServiceAsyncStub:
        return self.server.stub

    async def ingest(
        self, request: IngestRequest, stub: DeliveryReportServiceAsyncStub | None = None
    ) -> IngestResponse | ErrorDetails:
        """Ingest: OK (every acknowledged report fetchable) or INVALID_ARGUMENT, nothing else."""
        try:
            response = await (stub or self.stub).Ingest(request, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                pytest.fail(f"Ingest answered {error.code()}: {error.details()}")
            details = details_of(error)
            assert details.fields, "INVALID_ARGUMENT without field violations"
            note(f"Ingest: INVALID_ARGUMENT {details.reason}")
            return details
        note(f"Ingest: OK, {'some' if response.accepted_count else 'none'} accepted")
        fetched: set[str] = set()
        for result in response.results:
            assert result.outcome in (
                IngestOutcome.INGEST_OUTCOME_ACCEPTED,
                IngestOutcome.INGEST_OUTCOME_DUPLICATE,
                IngestOutcome.INGEST_OUTCOME_REJECTED,
            )
            if result.outcome == IngestOutcome.INGEST_OUTCOME_REJECTED:
                assert result.error.reason in ITEM_REASONS, result.error
            elif result.message_id not in fetched:
                fetched.add(result.message_id)
                await self.fetchable(result.message_id, Source.SOURCE_UNSPECIFIED, stub)
        return response

    async def fetchable(
        self, message_id: str, source: int, stub: DeliveryReportServiceAsyncStub | None = None
    ) -> None:
        fetched = await (stub or self.stub).GetMessage(
            GetMessageRequest(message_id=message_id, source=source),  # type: ignore[arg-type]
            timeout=TIMEOUT,
        )
        assert fetched.messages
        assert {state.message_id for state in fetched.messages} == {message_id}

    async def post(self, route: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """A webhook: 200 or 400 (413 over the limit), with a JSON body; never 500."""
        response = await self.http.post(route, content=body, timeout=HTTP_TIMEOUT)
        assert response.status_code in (200, 400, 413), (response.status_code, response.text[:300])
        answer = response.json()
        assert isinstance(answer, dict)
        note(f"webhook: {response.status_code} {answer.get('error', {}).get('reason', '')}")
        if response.status_code == 200:
            assert answer["rejected"] == 0
        elif "error" in answer:
            assert set(answer["error"]) == {"field", "reason", "description"}
        else:
            assert answer["rejected"] > 0
        return response.status_code, answer

    async def unchanged_and_alive(self) -> None:
        """Pre-ingested messages as they were; health SERVING; a valid Ingest acknowledged."""
        for message_id, before in self.snapshot.items():
            after = await self.stub.GetMessage(
                GetMessageRequest(message_id=message_id, include_history=True), timeout=TIMEOUT
            )
            assert after == before, message_id
        health = health_pb2_grpc.HealthStub(self.server.channel)
        check = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        self.alive_count += 1
        payload = json.dumps(gms_item(f"alive:{self.alive_count}"))
        response = await self.stub.Ingest(IngestRequest(payload=payload), timeout=TIMEOUT)
        assert response.accepted_count == 1

    async def both_ways(self, route: str, text: str, format: int = Format.FORMAT_UNSPECIFIED) -> None:
        """The same text through Ingest (as a verbatim payload) and through the webhook."""
        if is_utf8(text):  # a gRPC string must be UTF-8: lone surrogates only as JSON escapes
            await self.ingest(IngestRequest(payload=text, format=format))  # type: ignore[arg-type]
            await self.post(route, text.encode())
        await self.unchanged_and_alive()


@pytest.fixture
async def target(server: Running) -> AsyncIterator[Target]:
    async with attacked(server) as target:
        yield target


@asynccontextmanager
async def attacked(server: Running) -> AsyncIterator[Target]:
    """The server with some messages stored before the attack, and their snapshot."""
    response = await server.stub.Ingest(IngestRequest(payload=json.dumps(PRE_GMS)), timeout=TIMEOUT)
    assert response.accepted_count == 2
    for body in ({"results": [PRE_SMS]}, {"results": [PRE_SEEN]}):
        response = await server.stub.Ingest(IngestRequest(payload=dump(body)), timeout=TIMEOUT)
        assert response.accepted_count == 1
    snapshot = {
        message_id: await server.stub.GetMessage(
            GetMessageRequest(message_id=message_id, include_history=True), timeout=TIMEOUT
        )
        for message_id in PRE_IDS
    }
    assert [len(fetched.history) for fetched in snapshot.values()] == [1, 1, 2]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.app.http_port}") as http:
        yield Target(server, http, snapshot)


# Generated input.


@HYPOTHESIS
@given(case=hostile_reports(), format=formats, ascii_only=st.booleans())
async def test_reports_with_deleted_retyped_and_added_fields(
    target: Target, case: tuple[str, str], format: int, ascii_only: bool
) -> None:
    route, text = case
    if not ascii_only:  # the same payload with its non-ASCII characters unescaped, where it can be
        unescaped = dump(
            json.loads(text, parse_float=Raw, parse_int=Raw, parse_constant=Raw), ascii_only=False
        )
        text = unescaped if is_utf8(unescaped) else text
    await target.both_ways(route, text, format)


@HYPOTHESIS
@given(text=mutated_seeds(), format=formats, route=st.sampled_from([GMS_ROUTE, SMS_ROUTE]))
async def test_mutated_provider_examples(target: Target, text: str, format: int, route: str) -> None:
    await target.both_ways(route, text, format)


@HYPOTHESIS
@given(body=mutated_seed_bytes(), route=st.sampled_from([GMS_ROUTE, SMS_ROUTE]))
async def test_webhook_bodies_with_invalid_utf8_and_random_bytes(
    target: Target, body: bytes, route: str
) -> None:
    status, answer = await target.post(route, body)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        assert status == 400
        assert answer["error"]["reason"] == "INVALID_UTF8"
    else:
        assert answer.get("error", {}).get("reason") != "INVALID_UTF8"
    await target.unchanged_and_alive()


@HYPOTHESIS
@given(
    message_id=st.text(characters, max_size=24) | st.sampled_from(SPECIAL_CHARACTERS),
    surrogate=st.none() | st.tuples(st.integers(0, 24), lone_surrogates),
    kind=st.sampled_from(["gms", "sms"]),
    ascii_only=st.booleans(),
)
async def test_unicode_message_ids_are_stored_exactly_or_rejected(
    target: Target, message_id: str, surrogate: tuple[int, str] | None, kind: str, ascii_only: bool
) -> None:
    assume(not_pre(message_id))
    if surrogate is not None:  # a lone surrogate: only a JSON escape can carry it
        at, character = surrogate
        message_id = message_id[:at] + character + message_id[at:]
        ascii_only = True
    item = gms_item(message_id) if kind == "gms" else sms_item(message_id)
    body: Json = item if kind == "gms" else {"results": [item]}
    text = dump(body, ascii_only=ascii_only)
    id_field = "message_id" if kind == "gms" else "results[0].messageId"
    source = Source.SOURCE_GMS if kind == "gms" else Source.SOURCE_SENT_SMS_REPORT
    storable = message_id != "" and is_utf8(message_id)

    answer = await target.ingest(IngestRequest(payload=text))
    status, webhook = await target.post(GMS_ROUTE if kind == "gms" else SMS_ROUTE, text.encode())
    if storable:
        assert isinstance(answer, IngestResponse)
        assert [result.message_id for result in answer.results] == [message_id]
        assert status == 200
        assert webhook["results"][0]["outcome"] == "DUPLICATE"
        await target.fetchable(message_id, source)
    else:
        assert isinstance(answer, ErrorDetails)
        assert answer.fields == [id_field]
        assert status == 400
        assert webhook["results"][0]["error"]["field"] == id_field
        assert webhook["results"][0]["error"]["reason"] == "INVALID_VALUE"
    await target.unchanged_and_alive()


int64s = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
int32s = st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1)
proto_texts = st.text(characters, max_size=30)


@st.composite
def typed_reports(draw: st.DrawFn) -> IngestRequest:
    """Typed reports (GmsReports / SentSmsReports) with arbitrary strings and integers (of each field's
    width) in every field."""

    def fill(message: Any) -> Any:
        for descriptor in message.DESCRIPTOR.fields:
            if descriptor.message_type is not None:
                continue
            if descriptor.type == descriptor.TYPE_STRING:
                value: Any = draw(st.none() | proto_texts)
            elif descriptor.type == descriptor.TYPE_BOOL:
                value = draw(st.none() | st.booleans())
            elif descriptor.type == descriptor.TYPE_INT32:
                value = draw(int32s)
            else:
                value = draw(int64s)
            if value is not None:
                setattr(message, descriptor.name, value)
        return message

    if draw(st.booleans()):
        reports = [fill(GmsReport()) for _ in range(draw(st.integers(0, 3)))]
        for report in reports:
            assume(not_pre(report.message_id))
        return IngestRequest(gms=GmsReports(reports=reports))
    results = []
    for _ in range(draw(st.integers(0, 3))):
        report = fill(SentSmsReport())
        for part, kind in (
            ("price", SentSmsReportPrice),
            ("status", SentSmsReportStatus),
            ("error", SentSmsReportError),
            ("platform", SentSmsReportPlatform),
        ):
            if draw(st.booleans()):
                getattr(report, part).CopyFrom(fill(kind()))
        assume(not_pre(report.message_id))
        results.append(report)
    return IngestRequest(sent_sms_report=SentSmsReports(results=results))


@settings(HYPOTHESIS, max_examples=80)
@given(request=typed_reports())
async def test_typed_reports_with_arbitrary_values(target: Target, request: IngestRequest) -> None:
    await target.ingest(request)
    await target.unchanged_and_alive()


# Hand-made input.

DEEP = 100_000
SPECIAL_PAYLOADS: list[tuple[str, str, bool]] = [
    # (name, payload, must be INVALID_JSON)
    ("100k [", "[" * DEEP, True),
    ("100k [ closed", "[" * DEEP + "]" * DEEP, True),
    ("100k {", '{"a":' * DEEP, True),
    ("100k { closed", '{"a":' * DEEP + "1" + "}" * DEEP, True),
    ("deep results", '{"results":' + "[" * DEEP + "]" * DEEP + "}", True),
    ("deep in a report", dump({**gms_item("deep:1"), "x": Raw("[" * DEEP + "]" * DEEP)}), True),
    ("deep in a batch item", "[" + dump(gms_item("deep:2")) + "," + "[" * DEEP + "]" * DEEP + "]", True),
    ("deep objects in results", '{"results":[' + '{"a":' * DEEP + "1" + "}" * DEEP + "]}", True),
    ("10^5000 status", dump({**gms_item("big:1"), "status": Raw("1" + "0" * 5000)}), True),
    (
        "10^5000 price",
        dump({"results": [{**sms_item("big:2"), "price": {"pricePerMessage": Raw("9" * 5001)}}]}),
        True,
    ),
    ("NaN status", dump({**gms_item("nan:1"), "status": Raw("NaN")}), True),
    ("Infinity time", dump({**gms_item("nan:2"), "time": Raw("Infinity")}), True),
    (
        "-Infinity price",
        dump({"results": [{**sms_item("nan:3"), "price": {"pricePerMessage": float("-inf")}}]}),
        True,
    ),
    ("NaN alone", "NaN", True),
    ("nothing", "", True),
    ("white space", " \t\r\n ", True),
    ("BOM only", "\ufeff", True),
    ("unclosed string", '{"message_id": "x', True),
    ("1E999999999 status", dump({**gms_item("huge:1"), "status": Raw("1E999999999")}), False),
    ("1E999999999 time", dump({**gms_item("huge:2"), "time": Raw("1E999999999")}), False),
    (
        "-1E999999999 price",
        dump({"results": [{**sms_item("huge:3"), "price": {"pricePerMessage": Raw("-1E999999999")}}]}),
        False,
    ),
    (
        "1e400 groupId",
        dump({"results": [{**sms_item("huge:4"), "status": {"groupId": Raw("1e400"), "id": 5}}]}),
        False,
    ),
    ("-0 status", dump({**gms_item("zero:1"), "status": Raw("-0")}), False),
    ("-0.0 status", dump({**gms_item("zero:2"), "status": Raw("-0.0")}), False),
    (
        "1E-999999999 smsCount",
        dump({"results": [{**sms_item("tiny:1"), "smsCount": Raw("1E-999999999")}]}),
        False,
    ),
    (
        "NaN price text",
        dump({"results": [{**sms_item("nan:4"), "price": {"pricePerMessage": "NaN"}}]}),
        False,
    ),
    (
        "sNaN price text",
        dump({"results": [{**sms_item("nan:5"), "price": {"pricePerMessage": "sNaN"}}]}),
        False,
    ),
    (
        "Infinity price text",
        dump({"results": [{**sms_item("nan:6"), "price": {"pricePerMessage": "-Infinity"}}]}),
        False,
    ),
    ("time at the edge", dump({**gms_item("edge:1"), "time": Raw("253402300799999")}), False),
    ("time past the edge", dump({**gms_item("edge:2"), "time": Raw("253402300800000")}), False),
    (
        "doneAt past the edge",
        dump({"results": [{**sms_item("edge:3"), "doneAt": "9999-12-31T23:59:59-23:59"}]}),
        False,
    ),
    (
        "doneAt before the edge",
        dump({"results": [{**sms_item("edge:4"), "doneAt": "0001-01-01T00:00:00+23:59"}]}),
        False,
    ),
    ("duplicate keys", '{"message_id": "dup:1", "status": 2, "message_id": [1]}', False),
    ("results twice", '{"results": 5, "results": [' + dump(sms_item("dup:2")) + "]}", False),
    ("empty batch", "[]", False),
    ("empty results", '{"results": []}', False),
    ("a string", '"x"', False),
    ("a number", "42", False),
    ("null", "null", False),
    ("NUL characters", dump({**gms_item("nul:\x00:1"), "extra_id": "\x00" * 100}), False),
]


async def test_deep_nesting_huge_numbers_and_nan(target: Target) -> None:
    for name, payload, invalid_json in SPECIAL_PAYLOADS:
        for format in KNOWN_FORMATS:
            answer = await target.ingest(IngestRequest(payload=payload, format=format))
            if invalid_json:
                assert isinstance(answer, ErrorDetails), name
                assert answer.reason == "INVALID_JSON", (name, answer)
        for route in (GMS_ROUTE, SMS_ROUTE):
            status, webhook = await target.post(route, payload.encode())
            if invalid_json:
                assert status == 400, name
                assert webhook["error"]["reason"] == "INVALID_JSON", name
        await target.unchanged_and_alive()


WRONG_VALUES: list[Json] = [
    None,
    True,
    False,
    0,
    -1,
    2**64,
    "",
    "x",
    "12",
    " 1 ",
    "\x00",
    [],
    [1],
    {},
    {"a": 1},
    *(Raw(token) for token in NUMBER_TOKENS),
]


@pytest.mark.parametrize("kind", ["gms", "sms", "seen"])
async def test_every_wrong_type_in_every_field(target: Target, kind: str) -> None:
    """For each field, a batch with one item per wrong value: each item accepted or rejected on its own."""
    template = {"gms": GMS_TEMPLATE, "sms": SMS_TEMPLATE, "seen": SMS_SEEN_TEMPLATE}[kind]
    id_key = "message_id" if kind == "gms" else "messageId"
    for path in field_paths(template):
        name = ".".join(path)
        items: list[dict[str, Json]] = []
        for index, value in enumerate(WRONG_VALUES):
            item = copy.deepcopy(template)
            item[id_key] = f"wt:{kind}:{name}:{index}"
            set_path(item, path, value)
            items.append(item)
        prefix = "[{}]" if kind == "gms" else "results[{}]"
        text = dump(items if kind == "gms" else {"results": items})
        answer = await target.ingest(IngestRequest(payload=text))
        if isinstance(answer, ErrorDetails):  # every item rejected
            assert answer.reason == "ALL_ITEMS_REJECTED"
            rejected = {index: answer.fields[index] for index in range(len(items))}
        else:
            assert len(answer.results) == len(items)
            rejected = {
                result.index: result.error.field
                for result in answer.results
                if result.outcome == IngestOutcome.INGEST_OUTCOME_REJECTED
            }
        for index, error_field in rejected.items():
            assert error_field.startswith(prefix.format(index) + "."), (name, index, error_field)
        if path == (id_key,):  # the message id: a non-empty string, or the item is rejected
            should_reject = {i for i, v in enumerate(WRONG_VALUES) if not (isinstance(v, str) and v)}
            assert set(rejected) == should_reject, name
            assert all(rejected[i] == f"{prefix.format(i)}.{id_key}" for i in should_reject)
        # The webhook reads the same batch the same way (what was accepted is now a duplicate).
        route = GMS_ROUTE if kind == "gms" else SMS_ROUTE
        status, webhook = await target.post(route, text.encode())
        if "error" not in webhook:
            assert status == (400 if rejected else 200)
            by_webhook = {
                r["index"]: r["error"]["field"] for r in webhook["results"] if r["outcome"] == "REJECTED"
            }
            assert by_webhook == rejected, name
            assert all(r["outcome"] != "ACCEPTED" for r in webhook["results"])
    await target.unchanged_and_alive()


MB = 1024 * 1024


@pytest.mark.parametrize("raised", [False, True], ids=["item-limit", "item-limit-raised"])
async def test_multi_megabyte_strings(tmp_path: Path, clock: FakeClock, raised: bool) -> None:
    """A few MB in ids, in ignored fields, as escapes, as white space and as digits: with the default
    item limit (64 KiB) each such item is rejected ITEM_TOO_LARGE; with the limit raised past them,
    what is a valid report is stored."""
    limit = 64 * MB if raised else Settings().max_item_bytes
    # With items of megabytes, a message's state (its id and text) is larger than gRPC's default 4 MiB
    # receive limit: a client of such a server needs a larger one. With the default item limit, the
    # default receive limit takes every answer.
    options = [("grpc.max_receive_message_length", 64 * MB)] if raised else []
    async with (
        serving(tmp_path, clock=clock, max_item_bytes=limit) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel,
    ):
        server = Running(running, DeliveryReportServiceStub(channel), channel, clock, "")
        async with attacked(server) as target:
            too_large = None if raised else "ITEM_TOO_LARGE"
            cases: list[tuple[str, str, str | None, str | None]] = [
                # (route, payload, the message id it stores or None, the reason of each violation)
                (GMS_ROUTE, dump(gms_item("mb:" + "x" * (2 * MB))), "mb:" + "x" * (2 * MB), too_large),
                (
                    GMS_ROUTE,
                    dump({**gms_item("mb:extra"), "junk": "\U0001f600" * (MB // 2)}),
                    "mb:extra",
                    too_large,
                ),
                (
                    SMS_ROUTE,
                    dump({"results": [{**sms_item("mb:escapes"), "callbackData": "\x00\ud800" * (MB // 4)}]}),
                    None,
                    too_large or "INVALID_VALUE",  # an unpaired surrogate
                ),
                # White space outside the report is not part of the item.
                (GMS_ROUTE, dump(gms_item("mb:space")) + " " * (3 * MB), "mb:space", None),
                # Too long an integer for JSON: the whole payload is invalid, whatever the limits.
                (
                    GMS_ROUTE,
                    dump({**gms_item("mb:digits"), "status": Raw("1" * (3 * MB))}),
                    None,
                    "INVALID_JSON",
                ),
                (
                    SMS_ROUTE,
                    '{"results": [' + ",".join([dump(sms_item("mb:many"))] * 3000) + "]}",
                    "mb:many",
                    None,
                ),
            ]
            for route, payload, stored_id, reason in cases:
                assert len(payload) > MB
                answer = await target.ingest(IngestRequest(payload=payload))
                if reason is not None:
                    assert isinstance(answer, ErrorDetails)
                    assert answer.field_reasons == [reason]
                else:
                    assert isinstance(answer, IngestResponse)
                    assert answer.results[0].message_id == stored_id
                status, _ = await target.post(route, payload.encode())
                assert status == (400 if reason is not None else 200)
            await target.unchanged_and_alive()


def field_bytes(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand."""
    key, length = bytearray([number << 3 | 2]), bytearray()
    size = len(value)
    while True:
        byte = size & 0x7F
        size >>= 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            return bytes(key + length) + value


async def test_invalid_utf8_in_protobuf_strings_is_refused_before_the_servicer(target: Target) -> None:
    """IngestRequest bytes built by hand with invalid UTF-8 in string fields (no client library can).

    grpc.aio deserialises the request before the servicer runs and would answer UNKNOWN by itself;
    dlrhub's call interceptor wraps the deserializer, so the answer is INVALID_ARGUMENT
    (UNDECODABLE_REQUEST). Nothing is stored, and the server stays up.
    """
    call = target.server.channel.unary_unary(
        INGEST_METHOD, request_serializer=None, response_deserializer=None
    )
    valid_report = dump(gms_item("raw:ok")).encode()
    bad_report = b'{"message_id": "raw:\xff\xfe", "status": 2}'
    gms_report = field_bytes(3, b"raw:\xc0\xaf") + field_bytes(
        1, b"380961111111"
    )  # GmsReport.message_id, number
    requests = [
        field_bytes(1, bad_report),  # payload
        field_bytes(1, b"\xed\xa0\x80"),  # payload: an encoded surrogate
        field_bytes(1, valid_report) + field_bytes(5, b"\xff"),  # request_id
        field_bytes(3, field_bytes(1, gms_report)),  # gms.reports[0].message_id
        b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
        b"\xff\xff\xff",  # not protobuf at all
    ]
    before = target.server.app.store.latest_cursor()
    for raw in requests:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(raw, timeout=TIMEOUT)
        code, details = raised.value.code(), raised.value.details() or ""
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "not a valid protobuf message" in details, details
    assert target.server.app.store.latest_cursor() == before
    # The same bytes with valid UTF-8 go through the same hand-made path.
    answer = IngestResponse.FromString(await call(field_bytes(1, valid_report), timeout=TIMEOUT))
    assert answer.accepted_count == 1
    await target.unchanged_and_alive()
