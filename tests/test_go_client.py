"""The contract builds in other languages: `buf generate` (buf.gen.yaml) writes each language's code
where the .proto options say, and a Go program built from that code and Debian's grpc-go (client/go,
built offline by tools/go_client.py) works against `dlrhub serve`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FileDescriptor

from deliveryreport.v1 import (
    delivery_report_pb2,
    delivery_report_service_pb2,
    error_reason_pb2,
    provider_formats_pb2,
)
from deliveryreport.v1.error_reason_pb2 import ErrorReason
from tests.conftest import FIXTURES
from tests.helpers import PROCESS_TIMEOUT
from tools import go_client, launcher

FILES: list[FileDescriptor] = [
    module.DESCRIPTOR
    for module in (delivery_report_pb2, delivery_report_service_pb2, error_reason_pb2, provider_formats_pb2)
]
OPTIONS = (
    "csharp_namespace",
    "go_package",
    "java_multiple_files",
    "java_package",
    "objc_class_prefix",
    "php_namespace",
    "ruby_package",
)
REPORTS = FIXTURES / "gms_batch.json"  # three GMS reports in the shape of GMS's callback documentation
MALFORMED = FIXTURES / "gms_single_malformed.json"  # line 8: `"extra_id": AD-6640-7006",` (no quote)
DOMAIN = "deliveryreport.dlrhub.io"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `buf generate`'s output (build/gen) and the Go client (build/bin)."""
    out = tmp_path_factory.mktemp("contract-languages")
    try:
        go_client.build(out)
    except go_client.BuildError as error:
        pytest.fail(f"cannot build client/go (tools/go_client.py): {error}", pytrace=False)
    return out


def option(name: str) -> Any:
    """The value of a file option, the same in every file of deliveryreport.v1 (AIP-191)."""
    values = {getattr(file.GetOptions(), name) for file in FILES}
    assert len(values) == 1, f"{name} differs between the files: {values}"
    (value,) = values
    assert value, f"{name} is not set"
    return value


def test_every_file_names_its_package_in_every_language() -> None:
    for name in OPTIONS:
        option(name)
    outer = [file.GetOptions().java_outer_classname for file in FILES]
    assert len(set(outer)) == len(FILES)
    assert all(name.endswith("Proto") for name in outer)


def test_buf_generate_writes_each_language_where_its_option_says(built: Path) -> None:
    gen = built / "build" / "gen"
    java = gen / "java" / Path(*option("java_package").split("."))
    assert (java / "GetMessageRequest.java").is_file()  # java_multiple_files: a file per message
    for file in FILES:
        assert (java / f"{file.GetOptions().java_outer_classname}.java").is_file()
    csharp = (gen / "csharp" / "DeliveryReportService.cs").read_text()
    assert f"namespace {option('csharp_namespace')} {{" in csharp
    php = gen / "php" / Path(*option("php_namespace").split("\\"))
    assert f"namespace {option('php_namespace')};" in (php / "GetMessageRequest.php").read_text()
    ruby = (gen / "ruby" / "deliveryreport" / "v1" / "delivery_report_service_pb.rb").read_text()
    modules = option("ruby_package").split("::")
    assert "\n".join(f"{'  ' * depth}module {name}" for depth, name in enumerate(modules)) in ruby
    objc = (gen / "objc" / "deliveryreport" / "v1" / "DeliveryReportService.pbobjc.h").read_text()
    assert f"@interface {option('objc_class_prefix')}GetMessageRequest " in objc
    import_path, package = option("go_package").split(";")
    go = gen / "go" / "src" / import_path / "delivery_report_service_grpc.pb.go"
    assert f"package {package}\n" in go.read_text()


def test_go_client_ingests_gets_lists_streams_and_decodes_errors(
    built: Path, server_process: launcher.Server
) -> None:
    binary = built / "build" / "bin" / go_client.BINARY
    completed = subprocess.run(
        [str(binary), server_process.address, str(REPORTS), str(MALFORMED)],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, f"the Go client failed:\n{completed.stderr}\n{completed.stdout}"
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    steps = [line["step"] for line in lines]
    assert steps[:4] == ["stream", "ingest", "get_message", "list_messages"]
    assert set(steps[4:-2]) == {"stream"}
    assert steps[-2:] == ["ingest_error", "get_message_error"]
    response = {line["step"]: line.get("response") for line in lines}
    sent = json.loads(REPORTS.read_text())
    ids = [report["message_id"] for report in sent]

    # Ingest, in the BASIC view: each item's outcome, message id and cursor, no report.
    ingested = response["ingest"]
    assert ingested["accepted_count"] == 3
    results = ingested["results"]
    assert [result["outcome"] for result in results] == ["INGEST_OUTCOME_ACCEPTED"] * 3
    assert [result["message_id"] for result in results] == ids
    assert all("report" not in result for result in results)
    cursors = [result["cursor"] for result in results]
    assert [int(cursor) for cursor in cursors] == sorted(int(cursor) for cursor in cursors)

    # GetMessage: the first report (GMS status 2, hyber_status 23011: delivered by SMS) and its text.
    got = response["get_message"]
    [state] = got["messages"]
    assert state["message_id"] == ids[0]
    assert state["status"] == "DELIVERY_STATUS_DELIVERED"
    assert state["channel"] == "CHANNEL_SMS"
    assert state["reference"] == sent[0]["extra_id"]
    assert state["raw"]["gms"]["hyber_status"] == 23011  # int32: a JSON number
    [history] = got["history"]
    assert json.loads(history["raw_payload"]) == sent[0]

    # ListMessages by that reference: that message alone.
    listed = response["list_messages"]
    assert [message["message_id"] for message in listed["messages"]] == [ids[0]]
    assert listed["total_size"] == 1

    # Stream: a heartbeat at the start position, the three changes with Ingest's cursors, and a
    # heartbeat covering them; any heartbeat between carries the start position.
    streamed = [line["response"] for line in lines if line["step"] == "stream"]
    assert all(("change" in message) != ("heartbeat" in message) for message in streamed)
    changes = [message for message in streamed if "change" in message]
    assert [message["cursor"] for message in changes] == cursors
    assert [message["change"]["report"]["message_id"] for message in changes] == ids
    assert [message["change"]["state"]["status"] for message in changes] == [
        "DELIVERY_STATUS_DELIVERED",
        "DELIVERY_STATUS_EXPIRED",  # status 3, hyber_status 35015: SMS expired
        "DELIVERY_STATUS_DELIVERED",
    ]
    assert [message["change"]["report"]["channel"] for message in changes] == [
        "CHANNEL_SMS",
        "CHANNEL_SMS",
        "CHANNEL_VIBER",
    ]
    start = streamed[0]["cursor"]
    first_change = streamed.index(changes[0])
    assert all(message["cursor"] == start for message in streamed[:first_change])
    assert "heartbeat" in streamed[-1]
    assert streamed[-1]["cursor"] == cursors[-1]

    # The errors, decoded from the status details by Go.
    errors = {line["step"]: line["error"] for line in lines if "error" in line}
    invalid = errors["ingest_error"]
    assert invalid["code"] == "INVALID_ARGUMENT"
    assert (invalid["reason"], invalid["domain"]) == ("INVALID_JSON", DOMAIN)
    [violation] = invalid["field_violations"]
    assert (violation["field"], violation["reason"]) == ("payload", "INVALID_JSON")
    assert "line 8 column 16" in violation["description"]
    missing = errors["get_message_error"]
    assert missing["code"] == "NOT_FOUND"
    assert (missing["reason"], missing["domain"]) == ("MESSAGE_NOT_FOUND", DOMAIN)
    assert missing["metadata"] == {"message_id": "no-such-message"}
    assert {invalid["reason"], missing["reason"]} <= set(ErrorReason.keys())
